"""Penalties from token counts kept on the device equal penalties from the token lists."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from vlmserve.shared.messages import NewSeq, SamplingParams, SeqStep, StepPlan
from vlmserve.workers.model_runner import ModelRunner
from vlmserve.workers.penalties import PenaltyCounts, has_penalties
from vlmserve.workers.sampler import (
    SamplingInput,
    is_plain_greedy,
    process_logits,
    sample,
)

VOCAB = 50


def test_incremental_counts_give_the_list_penalties_step_after_step() -> None:
    rng = random.Random(0)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(temperature=0.0),  # no penalty: its row is left as it is
        SamplingParams(
            temperature=0.8, seed=5, repetition_penalty=0.9, frequency_penalty=-0.3, min_tokens=3
        ),
    ]
    # Ids past the vocabulary are ignored by both paths.
    prompts = [[rng.randrange(VOCAB + 5) for _ in range(rng.randint(1, 12))] for _ in params]
    tokens = [list(p) for p in prompts]
    counts = [PenaltyCounts(VOCAB, "cpu") if has_penalties(p) else None for p in params]
    for step in range(12):
        for row, seq in enumerate(tokens):  # a few new tokens per step, some repeated
            seq += [rng.choice(seq) if rng.random() < 0.5 else rng.randrange(VOCAB + 5)
                    for _ in range(rng.randint(1, 3))]  # fmt: skip
            if counts[row] is not None:
                counts[row].update(seq, len(prompts[row]))
        if step == 6:  # preempted and resumed: fresh counts catch up from every token
            counts[1] = PenaltyCounts(VOCAB, "cpu")
            counts[1].update(tokens[1], len(prompts[1]))
        outputs = [seq[len(p) :] for seq, p in zip(tokens, prompts, strict=True)]
        n_out = [len(o) for o in outputs]
        seeds = list(range(len(params)))
        by_lists = SamplingInput.build(params, seeds, n_out, prompts, outputs, [1])
        by_counts = SamplingInput.build(params, seeds, n_out, [], [], [1], penalty_counts=counts)
        logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(step))
        expected = process_logits(logits, by_lists)
        torch.testing.assert_close(process_logits(logits, by_counts), expected, rtol=0, atol=0)
        assert torch.equal(sample(logits, by_counts)[0], sample(logits, by_lists)[0])
        assert torch.equal(expected[2], logits[2])


def test_plain_greedy_rows() -> None:
    assert is_plain_greedy(SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    for changed in (
        {"temperature": 0.5}, {"logit_bias": {3: 1.0}}, {"repetition_penalty": 1.1},
        {"presence_penalty": 0.1}, {"frequency_penalty": 0.1}, {"min_tokens": 2},
        {"logprobs": 0}, {"bad_words_token_ids": [[4]]},
    ):  # fmt: skip
        assert not is_plain_greedy(SamplingParams(**{"temperature": 0.0, **changed})), changed


# ---- the model runner keeps the counts across steps and preemption -----------------------------


class TableModel(torch.nn.Module):
    """Logits that are a fixed random function of the last input token."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.randn(VOCAB + 8, VOCAB, generator=torch.Generator().manual_seed(1))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]  # [tokens, vocab]: the "hidden" is already the logits

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def test_runner_penalises_from_the_whole_history_through_preemption() -> None:
    backend = SimpleNamespace(pool=SimpleNamespace(block_size=16), prepare=lambda metadata: None)
    runner = ModelRunner(TableModel(), backend, [0], torch.device("cpu"))
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.8, ignore_eos=True),
        SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.9),
        SamplingParams(temperature=0.9, seed=3, frequency_penalty=2.0, repetition_penalty=0.7),
        SamplingParams(temperature=0.0),
    ]
    prompts = [[3, 4, 3, 9], [1, VOCAB + 2], [7], [2, 2]]
    tokens = [list(p) for p in prompts]
    seeds = [10, 11, 12, 13]
    new = [NewSeq(i, tokens[i], len(prompts[i]), p, seeds[i]) for i, p in enumerate(params)]
    steps = [SeqStep(i, 0, len(prompts[i]), [i]) for i in range(4)]
    plan = StepPlan(0, new, steps)
    differs = 0  # steps where the penalties changed some row's token
    for step_id in range(1, 16):
        result = runner.execute(plan)
        # What sample() gives from the token lists, row by row.
        logits = TableModel().table[[tokens[i][-1] for i in result.seq_ids]]
        outputs = [tokens[i][len(prompts[i]) :] for i in result.seq_ids]
        inp = SamplingInput.build(
            [params[i] for i in result.seq_ids], [seeds[i] for i in result.seq_ids],
            [len(o) for o in outputs], [prompts[i] for i in result.seq_ids], outputs, [0],
        )  # fmt: skip
        assert result.token_ids == sample(logits, inp)[0].tolist(), f"step {step_id}"
        differs += result.token_ids[:2] != logits[:2].argmax(-1).tolist()
        for i, token in zip(result.seq_ids, result.token_ids, strict=True):
            tokens[i].append(token)
        if step_id == 7:  # sequence 1 is preempted and resumed with its tokens so far
            plan = StepPlan(
                step_id,
                [NewSeq(1, list(tokens[1]), len(prompts[1]), params[1], seeds[1])],
                [SeqStep(i, len(tokens[i]) - 1, 1, [], [tokens[i][-1]]) for i in (0, 2, 3)]
                + [SeqStep(1, 0, len(tokens[1]), [1])],
                freed_seq_ids=[1],
            )
        else:
            plan = StepPlan(
                step_id, seqs=[SeqStep(i, len(tokens[i]) - 1, 1, [], [tokens[i][-1]])
                               for i in range(4)],
            )  # fmt: skip
    assert differs > 3, "the penalties must matter for this test to mean much"
    assert runner.seqs[3].penalties is None and runner.seqs[0].penalties is not None
