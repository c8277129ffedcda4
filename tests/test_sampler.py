"""Exact tests of workers/sampler.py against plain torch and HF transformers' processors."""

from __future__ import annotations

import math

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from vlmserve.shared.messages import SamplingParams
from vlmserve.workers.sampler import SamplingInput, draw_seed, process_logits, sample

VOCAB = 64


def make_logits(n: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int] | None = None,
    counts: list[int] | None = None,
    prompt_ids: list[list[int]] | None = None,
    output_ids: list[list[int]] | None = None,
    eos: list[int] | None = None,
):
    n = len(params)
    inp = SamplingInput.build(
        params,
        seeds if seeds is not None else list(range(n)),
        counts if counts is not None else [0] * n,
        prompt_ids if prompt_ids is not None else [[] for _ in range(n)],
        output_ids if output_ids is not None else [[] for _ in range(n)],
        eos if eos is not None else [],
    )
    return sample(logits, inp)


def test_greedy_equals_argmax():
    logits = make_logits(8)
    raw = logits.clone()
    tokens, logprobs = run(logits, [SamplingParams(temperature=0.0)] * 8)
    # Compared with torch.argmax of the raw logits; the input is left untouched.
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, raw.argmax(-1))
    assert torch.equal(logits, raw)
    assert logprobs is None


def test_plain_batch_builds_no_optional_work():
    inp = SamplingInput.build(
        [SamplingParams()] * 3, [1, 2, 3], [0] * 3, [[1, 2]] * 3, [[3]] * 3, [0]
    )
    # The common case: no filter, penalty, bias or mask tensors at all.
    assert (inp.top_k, inp.top_p, inp.min_p, inp.bias, inp.seen, inp.output, inp.banned) == (
        None,
    ) * 7
    assert inp.logprob_rows == []


def test_seeded_draws_independent_of_batch():
    logits = make_logits(6)
    params = [SamplingParams(temperature=1.0 + 0.1 * i, top_p=0.9) for i in range(6)]
    seeds = [11, 22, 33, 44, 55, 66]
    counts = [0, 3, 7, 1, 2, 9]
    full, _ = run(logits, params, seeds, counts)
    again, _ = run(logits, params, seeds, counts)
    assert torch.equal(full, again)
    # Each row alone (as after preemption) gives the token it got in the full batch.
    for i in range(6):
        alone, _ = run(logits[i : i + 1], [params[i]], [seeds[i]], [counts[i]])
        assert alone.item() == full[i].item()
    # Reversed order, and mixed with greedy rows, gives the same tokens per row.
    perm = list(reversed(range(6)))
    rev, _ = run(
        logits[perm], [params[i] for i in perm], [seeds[i] for i in perm], [counts[i] for i in perm]
    )
    assert torch.equal(rev, full[perm])
    mixed_logits = torch.cat([make_logits(2, seed=5), logits])
    mixed, _ = run(
        mixed_logits,
        [SamplingParams(temperature=0.0)] * 2 + params,
        [0, 0] + seeds,
        [0, 0] + counts,
    )
    assert torch.equal(mixed[2:], full)
    assert torch.equal(mixed[:2], mixed_logits[:2].argmax(-1))


def test_different_seeds_and_positions_differ():
    logits = torch.zeros(1, 1000)  # uniform: 1000 equally likely tokens
    p = [SamplingParams(temperature=1.0)]
    by_seed = {run(logits, p, [s])[0].item() for s in range(40)}
    by_count = {run(logits, p, [7], [c])[0].item() for c in range(40)}
    # 40 uniform draws from 1000 tokens: all-equal is impossible by chance; expect many values.
    assert len(by_seed) > 30 and len(by_count) > 30
    assert draw_seed(1, 0) != draw_seed(0, 1) and draw_seed(-1, 0) == draw_seed(2**64 - 1, 0)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = make_logits(16, seed=3)
    greedy = logits.argmax(-1)
    for params in (
        SamplingParams(temperature=2.0, top_k=1),
        SamplingParams(temperature=2.0, top_p=1e-6),
    ):
        for seed in range(5):
            tokens, _ = run(logits, [params] * 16, [seed * 100 + i for i in range(16)])
            # Compared with torch.argmax of the raw logits.
            assert torch.equal(tokens, greedy)


def test_top_k_keeps_only_top_k():
    logits = make_logits(4, seed=4)
    top3 = logits.topk(3, dim=-1).indices
    for seed in range(30):
        tokens, _ = run(
            logits,
            [SamplingParams(temperature=5.0, top_k=3)] * 4,
            [seed * 10 + i for i in range(4)],
        )
        # Every drawn token is among torch.topk's 3.
        assert (top3 == tokens.unsqueeze(1)).any(1).all()


def test_min_p_filters_below_threshold():
    # softmax([0, 0, -ln 4, -10]) ~ [.444, .444, .111, 2e-5].
    logits = torch.tensor([[0.0, 0.0, -math.log(4.0), -10.0]]).repeat(300, 1)
    seeds = list(range(300))
    # min_p .3: threshold .133 keeps only tokens 0 and 1.
    tokens, _ = run(logits, [SamplingParams(temperature=1.0, min_p=0.3)] * 300, seeds)
    assert set(tokens.tolist()) == {0, 1}
    # min_p .2: threshold .089 keeps token 2 too (1 in 9 draws), never token 3.
    tokens, _ = run(logits, [SamplingParams(temperature=1.0, min_p=0.2)] * 300, seeds)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_temperature_distribution_matches_softmax():
    n = 4000
    base = torch.tensor([1.0, 0.0, -0.5, 0.7])
    temp = 0.8
    tokens, _ = run(
        base.repeat(n, 1), [SamplingParams(temperature=temp)] * n, [1000 + i for i in range(n)]
    )
    observed = torch.bincount(tokens, minlength=4).double()
    expected = torch.softmax(base.double() / temp, dim=0) * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    # Chi-square with 3 degrees of freedom: 16.27 is the p = 0.001 bound; seeds are fixed.
    assert chi2 < 16.27, (observed, expected)


def test_repetition_penalty_matches_transformers():
    logits = make_logits(3, seed=6)
    prompt = [[1, 2, 3], [5, 5, 9], [60]]
    output = [[3, 4], [], [0, 63, 63]]
    tokens, _ = run(
        logits,
        [SamplingParams(temperature=0.0, repetition_penalty=1.3)] * 3,
        prompt_ids=prompt,
        output_ids=output,
    )
    hf = torch.cat(
        [
            RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([p + o]), logits[i : i + 1].clone())
            for i, (p, o) in enumerate(zip(prompt, output, strict=True))
        ]
    )
    inp = SamplingInput.build(
        [SamplingParams(repetition_penalty=1.3)] * 3, [0] * 3, [0] * 3, prompt, output, []
    )
    # Compared with transformers' RepetitionPenaltyLogitsProcessor on the same ids and logits.
    torch.testing.assert_close(process_logits(logits, inp), hf, rtol=0, atol=0)
    assert torch.equal(tokens, hf.argmax(-1))


def test_repetition_penalty_only_on_its_rows_and_ignores_ids_past_vocab():
    logits = make_logits(2, seed=7)
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams()]
    inp = SamplingInput.build(params, [0, 0], [0, 0], [[0, VOCAB + 5], [0]], [[1], [1]], [])
    out = process_logits(logits, inp)
    expected = logits.clone()
    for t in (0, 1):
        v = expected[0, t]
        expected[0, t] = v / 2 if v > 0 else v * 2
    assert torch.equal(out, expected)


def test_presence_and_frequency_penalty_exact():
    logits = torch.zeros(2, 8)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(frequency_penalty=1.0),
    ]
    # Prompt tokens never count for these two penalties.
    inp = SamplingInput.build(params, [0, 0], [4, 2], [[7, 7], [6]], [[1, 1, 1, 2], [3, 3]], [])
    expected = torch.zeros(2, 8)
    expected[0, 1] = -(0.5 + 0.25 * 3)
    expected[0, 2] = -(0.5 + 0.25 * 1)
    expected[1, 3] = -(0.0 + 1.0 * 2)
    assert torch.equal(process_logits(logits, inp), expected)


def test_logit_bias():
    logits = torch.zeros(2, 8)
    tokens, _ = run(
        logits,
        [
            SamplingParams(temperature=0.0, logit_bias={5: 3.0, 2: 1.0}),
            SamplingParams(temperature=0.7, logit_bias={6: 100.0}),
        ],
    )
    assert tokens.tolist() == [5, 6]
    inp = SamplingInput.build(
        [SamplingParams(logit_bias={5: 3.0, 2: -1.5})], [0], [0], [[]], [[]], []
    )
    expected = torch.zeros(1, 8)
    expected[0, 5], expected[0, 2] = 3.0, -1.5
    assert torch.equal(process_logits(torch.zeros(1, 8), inp), expected)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(3, 8)
    logits[:, 0] = 10.0  # eos
    logits[:, 4] = 9.0  # a stop id
    logits[:, 6] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[4])
    tokens, _ = run(logits, [params] * 3, counts=[0, 1, 2], eos=[0])
    # Under min_tokens both eos (even with ignore_eos) and stop ids are masked; at 2 they are not.
    assert tokens.tolist() == [6, 6, 0]


def test_logprobs_equal_log_softmax_of_raw_logits():
    logits = make_logits(4, seed=8)
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=5.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=0.5, logprobs=5, logit_bias={1: 50.0}),
    ]
    tokens, lps = run(logits, params, prompt_ids=[[int(logits[0].argmax())], [], [], []])
    ref = torch.log_softmax(logits, dim=-1)
    assert lps is not None and lps[1] is None
    assert tokens[3].item() == 1
    for i, n in ((0, 3), (2, 0), (3, 5)):
        lp = lps[i]
        # Chosen token's logprob is the raw log_softmax (before penalties, bias, temperature).
        assert lp.logprob == ref[i, tokens[i]].item()
        vals, ids = ref[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert lp.top_ids == ids.tolist()
        assert lp.top_logprobs == vals.tolist()
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)


def test_no_logprobs_requested_returns_none():
    _, lps = run(make_logits(2), [SamplingParams(temperature=0.9)] * 2)
    assert lps is None


def test_empty_batch():
    tokens, lps = run(torch.zeros(0, VOCAB), [])
    assert tokens.shape == (0,) and lps is None
