"""Runs one StepPlan: keeps the workers' view of each sequence, builds the batch, samples.

Every rank keeps the same sequence states (the plan tells all ranks the same thing); only
rank 0's sampled tokens are sent back to the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from vlmserve.shared.messages import (
    NewSeq,
    PromptLogprobs,
    SamplingParams,
    SeqStep,
    StepPlan,
    StepResult,
)
from vlmserve.workers.attention.backend import AttentionBackend
from vlmserve.workers.attention.context import step_context
from vlmserve.workers.attention.metadata import AttentionMetadata, spans_of
from vlmserve.workers.layers.deepstack import LayerAdditions
from vlmserve.workers.logits_processors import (
    FACTORIES,
    Factory,
    LogitsProcessor,
    ProcessorRow,
    processors_for,
)
from vlmserve.workers.multimodal import ImageInputs, SeqImage, SeqPositions
from vlmserve.workers.penalties import PenaltyCounts, has_penalties
from vlmserve.workers.prompt_logprobs import (
    PromptLogprobsBuffer,
    score_prompt_tokens,
    scored_positions,
    split_scores,
)
from vlmserve.workers.sampler import SamplingInput, is_plain_greedy, sample
from vlmserve.workers.seq_table import SeqTable


@dataclass
class SeqState:
    token_ids: list[int]
    prompt_len: int
    sampling: SamplingParams
    seed: int
    images: list[SeqImage] = field(default_factory=list)
    mrope: SeqPositions | None = None  # Qwen2-VL's multimodal positions
    processors: list[LogitsProcessor] = field(default_factory=list)  # rank 0's only
    plain: bool = False  # its token is the raw argmax (sampler.is_plain_greedy, no processor)
    penalties: PenaltyCounts | None = None  # made at its first sampling when it has penalties
    # Set while the sequence wants the logprobs of its prompt and has not sampled yet.
    prompt_logprobs: PromptLogprobsBuffer | None = None


@dataclass(frozen=True)
class Batch:
    """The flattened inputs of one step."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens], or [3, tokens] for multimodal RoPE
    input_embeds: torch.Tensor | None  # [tokens, hidden] when images are in the step
    additions: LayerAdditions | None  # DeepStack levels of the step's image tokens
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [sampling seqs] index of each sampling seq's last token
    sample_seq_ids: list[int]
    # Rows whose logits score the next prompt token (workers/prompt_logprobs.py), the tokens
    # they score, and per sequence: (seq id, first scored position, number of rows), in order.
    prompt_rows: torch.Tensor | None = None  # [scored rows]
    prompt_targets: torch.Tensor | None = None  # [scored rows]
    prompt_spans: tuple[tuple[int, int, int], ...] = ()


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        eos_token_ids: list[int],
        device: torch.device,
        encoder_cache_bytes: int = 1 << 30,
        samples: bool = True,
        processor_factories: tuple[Factory, ...] = FACTORIES,
    ) -> None:
        self.model = model
        self.samples = samples  # False on ranks other than 0
        self.processor_factories = processor_factories  # FACTORIES, plus the grammar mask's
        self.backend = backend  # attention over its KV pool
        self.block_size = backend.pool.block_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.seqs: dict[int, SeqState] = {}
        self.table = SeqTable(device)  # block tables on the device, one row per sequence
        self.images = None
        if hasattr(model, "vision"):
            self.images = ImageInputs(model, device, encoder_cache_bytes)
        # Gemma 3: each image's tokens attend to each other both ways in prefill.
        self.bidirectional_images = getattr(model, "bidirectional_images", False)

    def update_states(self, plan: StepPlan, frames: list) -> dict[int, str]:
        """Apply the plan to the sequence states; return the new sequences that failed (their
        images could not be used), which are dropped here and left out of the step."""
        for seq_id in plan.freed_seq_ids:
            self.seqs.pop(seq_id, None)
            self.table.remove(seq_id)
        for new in plan.new_seqs:
            self.seqs[new.seq_id] = self._new_state(new)
            self.table.remove(new.seq_id)  # a resumed sequence starts its table anew
            self.table.add(new.seq_id)
        failed: dict[int, str] = {}
        if self.images is not None and plan.new_seqs:
            arrived, failed = self.images.arrive(plan.new_seqs, frames)
            for seq_id, (images, mrope) in arrived.items():
                self.seqs[seq_id].images, self.seqs[seq_id].mrope = images, mrope
            for seq_id in failed:
                del self.seqs[seq_id]
                self.table.remove(seq_id)
        for step in plan.seqs:
            if step.seq_id in failed:
                continue
            state = self.seqs[step.seq_id]
            state.token_ids.extend(step.new_token_ids)
            self.table.append_blocks(step.seq_id, step.new_block_ids)
        return failed

    def _new_state(self, new: NewSeq) -> SeqState:
        state = SeqState(list(new.token_ids), new.prompt_len, new.sampling, new.seed)
        # A sequence resumed after it sampled has sent its prompt logprobs with that token.
        if new.sampling.prompt_logprobs is not None and len(new.token_ids) == new.prompt_len:
            state.prompt_logprobs = PromptLogprobsBuffer(new.sampling.prompt_logprobs)
        if self.samples:  # made anew for a resumed sequence: they catch up from its tokens
            state.processors = processors_for(new.sampling, self.processor_factories)
        state.plain = is_plain_greedy(new.sampling) and not state.processors
        return state

    def build_batch(self, steps: list[SeqStep]) -> Batch:
        """Flatten the step's sequences, decodes (one new token each) first."""
        steps = sorted(steps, key=lambda step: step.num_tokens != 1)  # stable: plan order kept
        states = [self.seqs[step.seq_id] for step in steps]
        input_ids: list[int] = []
        mrope: list[torch.Tensor] = []
        image_spans = []
        both_ways: list[list[tuple[int, int]]] = []  # per sequence, its images in this step
        sample_rows: list[int] = []
        sample_seq_ids: list[int] = []
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_spans: list[tuple[int, int, int]] = []
        for step, state in zip(steps, states, strict=True):
            start, end = step.start, step.start + step.num_tokens
            row = len(input_ids)
            input_ids.extend(state.token_ids[start:end])
            if state.mrope is not None:
                mrope.append(state.mrope.span(start, end))
            if state.images and start < state.images[-1].offset + state.images[-1].length:
                image_spans.append((row, start, end, state.images))
            if self.bidirectional_images:
                both_ways.append(
                    [(i.offset, i.offset + i.length) for i in state.images
                     if i.offset < end and start < i.offset + i.length]
                )  # fmt: skip
            if step.sample:
                sample_rows.append(row + step.num_tokens - 1)
                sample_seq_ids.append(step.seq_id)
            if state.prompt_logprobs is not None and (
                scored := scored_positions(start, step.num_tokens, state.prompt_len)
            ):
                prompt_rows += [row + p - start for p in scored]
                prompt_targets += state.token_ids[scored.start + 1 : scored.stop + 1]
                prompt_spans.append((step.seq_id, scored.start, len(scored)))
        metadata, ids, sample_rows_t = self.table.metadata(
            [step.seq_id for step in steps],
            [step.start for step in steps],
            [step.num_tokens for step in steps],
            input_ids,
            sample_rows,
            self.block_size,
        )
        if any(both_ways):  # the scheduler never ends a prefill chunk inside such a span
            metadata = replace(metadata, bidirectional=spans_of(both_ways, len(steps)))
        embeds, additions = self.images.embed(ids, image_spans) if image_spans else (None, None)
        return Batch(
            input_ids=ids,
            # Multimodal RoPE has its own positions (every sequence has them, or none does).
            positions=torch.cat(mrope, dim=-1).to(self.device) if mrope else metadata.positions,
            input_embeds=embeds,
            additions=additions,
            metadata=metadata,
            sample_rows=sample_rows_t,
            sample_seq_ids=sample_seq_ids,
            prompt_rows=torch.tensor(prompt_rows, dtype=torch.long, device=self.device)
            if prompt_rows
            else None,
            prompt_targets=torch.tensor(prompt_targets, dtype=torch.long, device=self.device)
            if prompt_rows
            else None,
            prompt_spans=tuple(prompt_spans),
        )

    def _sampling_input(self, seq_ids: list[int], vocab: int) -> SamplingInput:
        states = [self.seqs[seq_id] for seq_id in seq_ids]
        for s in states:  # penalties read token counts kept on the device, caught up here
            if s.penalties is None and has_penalties(s.sampling):
                s.penalties = PenaltyCounts(vocab, self.device)
            if s.penalties is not None:
                s.penalties.update(s.token_ids, s.prompt_len)
        return SamplingInput.build(
            params=[s.sampling for s in states],
            seeds=[s.seed for s in states],
            output_counts=[len(s.token_ids) - s.prompt_len for s in states],
            prompt_ids=[],
            output_ids=[],
            eos_token_ids=self.eos_token_ids,
            device=self.device,
            processors=[
                ProcessorRow(row, processor, s.token_ids, s.prompt_len)
                for row, s in enumerate(states)
                for processor in s.processors
            ],
            penalty_counts=[s.penalties for s in states],
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan, frames: list | None = None) -> StepResult:
        """Run the plan's forward pass and sample every sequence whose step asks for it.

        `frames` are the image arrays of the plan's new sequences, in order.
        """
        failed = self.update_states(plan, frames or [])
        steps = [step for step in plan.seqs if step.seq_id not in failed]
        if not steps:
            return StepResult(step_id=plan.step_id, seq_ids=[], token_ids=[], failed=failed)
        batch = self.build_batch(steps)
        with step_context(batch.metadata, self.backend):
            if batch.input_embeds is None:
                hidden = self.model(batch.input_ids, batch.positions)  # [tokens, hidden]
            elif batch.additions is None:
                hidden = self.model(batch.input_ids, batch.positions, batch.input_embeds)
            else:
                hidden = self.model(
                    batch.input_ids, batch.positions, batch.input_embeds, batch.additions
                )
        if batch.prompt_rows is not None:
            self._score_prompts(batch, hidden)
        if not batch.sample_seq_ids:
            return StepResult(step_id=plan.step_id, seq_ids=[], token_ids=[], failed=failed)
        logits = self.model.compute_logits(hidden[batch.sample_rows]).float()  # [seqs, vocab]
        prompt_logprobs = self._finished_prompts(batch.sample_seq_ids)
        if not self.samples:  # every rank takes part in the logits' gather; rank 0 samples
            return StepResult(step_id=plan.step_id, seq_ids=[], token_ids=[])
        if all(self.seqs[seq_id].plain for seq_id in batch.sample_seq_ids):
            token_ids, logprobs = logits.argmax(dim=-1), None  # what sample() gives such rows
        else:
            inputs = self._sampling_input(batch.sample_seq_ids, logits.shape[-1])
            token_ids, logprobs = sample(logits, inputs)
        return StepResult(
            step_id=plan.step_id,
            seq_ids=batch.sample_seq_ids,
            token_ids=token_ids.tolist(),
            logprobs=logprobs,
            failed=failed,
            prompt_logprobs=prompt_logprobs,
        )

    def _score_prompts(self, batch: Batch, hidden: torch.Tensor) -> None:
        """Add this step's prompt positions to their sequences' prompt logprobs (rank 0)."""
        buffers = [self.seqs[seq_id].prompt_logprobs for seq_id, _, _ in batch.prompt_spans]
        scores = score_prompt_tokens(
            self.model.compute_logits,
            hidden[batch.prompt_rows],
            batch.prompt_targets,
            max(buffer.num_top for buffer in buffers),
            keep=self.samples,
        )
        if scores is None:
            return
        parts = split_scores(scores, [count for _, _, count in batch.prompt_spans])
        for (_, first, _), buffer, part in zip(batch.prompt_spans, buffers, parts, strict=True):
            buffer.add(first, part)

    def _finished_prompts(self, seq_ids: list[int]) -> dict[int, PromptLogprobs]:
        """The prompt logprobs of the sequences sampling their first token now, taken from
        their states (they are sent once)."""
        done: dict[int, PromptLogprobs] = {}
        for seq_id in seq_ids:
            state = self.seqs[seq_id]
            if state.prompt_logprobs is not None:
                done[seq_id] = state.prompt_logprobs.result()
                state.prompt_logprobs = None
        return done
