"""Runs one StepPlan: keeps the workers' view of each sequence, builds the batch, samples.

Every rank keeps the same sequence states (the plan tells all ranks the same thing); only
rank 0's sampled tokens are sent back to the scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmserve.shared.messages import NewSeq, SamplingParams, SeqStep, StepPlan, StepResult
from vlmserve.workers.forward_context import DecodeGroup, ForwardContext, PrefillSpan, step_context
from vlmserve.workers.multimodal import ImageInputs, SeqImage, SeqPositions
from vlmserve.workers.sampler import SamplingInput, sample

DECODE_GROUP = 8  # decodes attended together (8 measured faster than 4, 16, 32 at batch 64)


@dataclass
class SeqState:
    token_ids: list[int]
    prompt_len: int
    sampling: SamplingParams
    seed: int
    block_table: list[int] = field(default_factory=list)
    images: list[SeqImage] = field(default_factory=list)
    mrope: SeqPositions | None = None  # Qwen2-VL's multimodal positions


@dataclass(frozen=True)
class Batch:
    """The flattened inputs of one step."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens], or [3, tokens] for multimodal RoPE
    input_embeds: torch.Tensor | None  # [tokens, hidden] when images are in the step
    context: ForwardContext
    sample_rows: torch.Tensor  # [sampling seqs] index of each sampling seq's last token
    sample_seq_ids: list[int]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        block_size: int,
        eos_token_ids: list[int],
        device: torch.device,
        encoder_cache_bytes: int = 1 << 30,
        samples: bool = True,
    ) -> None:
        self.model = model
        self.samples = samples  # False on ranks other than 0
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.seqs: dict[int, SeqState] = {}
        self.images = None
        if hasattr(model, "vision"):
            self.images = ImageInputs(model, device, encoder_cache_bytes)

    def update_states(self, plan: StepPlan, frames: list) -> None:
        for seq_id in plan.freed_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in plan.new_seqs:
            self.seqs[new.seq_id] = self._new_state(new)
        if self.images is not None and plan.new_seqs:
            arrived = self.images.arrive(plan.new_seqs, frames)
            for seq_id, (images, mrope) in arrived.items():
                self.seqs[seq_id].images, self.seqs[seq_id].mrope = images, mrope
        for step in plan.seqs:
            state = self.seqs[step.seq_id]
            state.token_ids.extend(step.new_token_ids)
            state.block_table.extend(step.new_block_ids)

    @staticmethod
    def _new_state(new: NewSeq) -> SeqState:
        return SeqState(list(new.token_ids), new.prompt_len, new.sampling, new.seed)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a sequence."""
        positions = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def build_batch(self, steps: list[SeqStep]) -> Batch:
        """Flatten the step's sequences; decodes (one new token after a context) go batched."""
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        prefills: list[PrefillSpan] = []
        decode_rows: list[int] = []
        decode_steps: list[SeqStep] = []
        sample_rows: list[int] = []
        sample_seq_ids: list[int] = []
        image_spans = []
        for step in steps:
            state = self.seqs[step.seq_id]
            start, end = step.start, step.start + step.num_tokens
            row = len(input_ids)
            input_ids.extend(state.token_ids[start:end])
            if state.mrope is not None:
                positions.append(state.mrope.span(start, end))
            else:
                positions.append(torch.arange(start, end))
            if state.images and start < state.images[-1].offset + state.images[-1].length:
                image_spans.append((row, start, end, state.images))
            slot_mapping.append(self._slots(state.block_table, start, end))
            if step.num_tokens == 1 and start > 0:
                decode_rows.append(row)
                decode_steps.append(step)
            else:
                # A chunk after cached tokens attends to them too: all its context's slots.
                cached = self._slots(state.block_table, 0, end) if start > 0 else None
                prefills.append(PrefillSpan(row, step.num_tokens, end, cached))
            if step.sample:
                sample_rows.append(row + step.num_tokens - 1)
                sample_seq_ids.append(step.seq_id)
        context = ForwardContext(
            slot_mapping=torch.cat(slot_mapping).to(self.device),
            prefills=[self._to_device(p) for p in prefills],
            decodes=self._decode_groups(decode_rows, decode_steps),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        return Batch(
            input_ids=ids,
            positions=torch.cat(positions, dim=-1).to(self.device),
            input_embeds=self.images.embed(ids, image_spans) if image_spans else None,
            context=context,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
            sample_seq_ids=sample_seq_ids,
        )

    def _to_device(self, span: PrefillSpan) -> PrefillSpan:
        if span.ctx_slots is None:
            return span
        slots = span.ctx_slots.to(self.device)
        return PrefillSpan(span.q_start, span.q_len, span.ctx_len, slots)

    def _decode_groups(self, rows: list[int], steps: list[SeqStep]) -> list[DecodeGroup]:
        """Decodes sorted by context length, in groups: padding each group to its longest
        context gathers far fewer padded keys than padding the whole batch to the longest."""
        order = sorted(range(len(rows)), key=lambda i: steps[i].start)
        groups = []
        for first in range(0, len(order), DECODE_GROUP):
            members = order[first : first + DECODE_GROUP]
            lengths = torch.tensor([steps[i].start + 1 for i in members])
            num_blocks = (int(lengths.max()) + self.block_size - 1) // self.block_size
            tables = torch.zeros(len(members), num_blocks, dtype=torch.long)
            for row, i in enumerate(members):
                table = self.seqs[steps[i].seq_id].block_table[:num_blocks]
                tables[row, : len(table)] = torch.tensor(table)
            positions = torch.arange(num_blocks * self.block_size)
            padding = positions[None, :] >= lengths[:, None]
            groups.append(
                DecodeGroup(
                    token_idx=torch.tensor([rows[i] for i in members], device=self.device),
                    block_tables=tables.to(self.device),
                    padding=padding[:, None, :].to(self.device),
                )
            )
        return groups

    def _sampling_input(self, seq_ids: list[int]) -> SamplingInput:
        states = [self.seqs[seq_id] for seq_id in seq_ids]
        return SamplingInput.build(
            params=[s.sampling for s in states],
            seeds=[s.seed for s in states],
            output_counts=[len(s.token_ids) - s.prompt_len for s in states],
            prompt_ids=[s.token_ids[: s.prompt_len] for s in states],
            output_ids=[s.token_ids[s.prompt_len :] for s in states],
            eos_token_ids=self.eos_token_ids,
            device=self.device,
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan, frames: list | None = None) -> StepResult:
        """Run the plan's forward pass and sample every sequence whose step asks for it.

        `frames` are the image arrays of the plan's new sequences, in order.
        """
        started = time.perf_counter()
        self.update_states(plan, frames or [])
        if not plan.seqs:
            return StepResult(step_id=plan.step_id, seq_ids=[], token_ids=[])
        batch = self.build_batch(plan.seqs)
        with step_context(batch.context):
            if batch.input_embeds is None:
                hidden = self.model(batch.input_ids, batch.positions)  # [tokens, hidden]
            else:
                hidden = self.model(batch.input_ids, batch.positions, batch.input_embeds)
        if not batch.sample_seq_ids:
            return StepResult(step_id=plan.step_id, seq_ids=[], token_ids=[])
        logits = self.model.compute_logits(hidden[batch.sample_rows]).float()  # [seqs, vocab]
        if not self.samples:  # every rank takes part in the logits' all-gather; rank 0 samples
            return StepResult(step_id=plan.step_id, seq_ids=[], token_ids=[])
        token_ids, logprobs = sample(logits, self._sampling_input(batch.sample_seq_ids))
        return StepResult(
            step_id=plan.step_id,
            seq_ids=batch.sample_seq_ids,
            token_ids=token_ids.tolist(),
            logprobs=logprobs,
            forward_s=time.perf_counter() - started,
        )
