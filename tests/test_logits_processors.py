"""Logits processors: bad_words against transformers' NoBadWordsLogitsProcessor, the sampler's
hook, the model runner's per-sequence processors across preemption, and the real engine."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import transformers
from hf_reference import compare_greedy
from transformers import NoBadWordsLogitsProcessor

from vlmserve.deploy.launcher import scheduler_and_workers
from vlmserve.frontend.offline import run_requests
from vlmserve.shared.messages import NewSeq, SamplingParams, SeqStep, StepPlan
from vlmserve.workers.logits_processors import (
    BadWords,
    LogitsProcessor,
    ProcessorRow,
    processors_for,
)
from vlmserve.workers.model_runner import ModelRunner
from vlmserve.workers.sampler import SamplingInput, sample

VOCAB = 32
NEG_INF = float("-inf")


def banned_by(processor: LogitsProcessor, token_ids: list[int], prompt_len: int) -> set[int]:
    logits = torch.zeros(VOCAB)
    processor(logits, token_ids, prompt_len)
    return set(torch.nonzero(logits == NEG_INF).flatten().tolist())


# ---- BadWords ----------------------------------------------------------------------------------


def test_bad_words_match_transformers_on_generated_tokens() -> None:
    rng = random.Random(0)
    for _ in range(200):
        words = [[rng.randrange(4) for _ in range(rng.randint(1, 3))] for _ in range(3)]
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))]
        generated = [rng.randrange(4) for _ in range(rng.randint(1, 6))]
        ours = banned_by(BadWords(words), prompt + generated, len(prompt))
        # vLLM's rule is HF's applied to the generated tokens only (the prompt never counts).
        scores = NoBadWordsLogitsProcessor(words)(torch.tensor([generated]), torch.zeros(1, VOCAB))
        assert ours == set(torch.nonzero(scores[0] == NEG_INF).flatten().tolist()), (
            words,
            generated,
        )


def test_bad_words_ignore_the_prompt_and_ids_outside_the_vocab() -> None:
    bad = BadWords([[3, 4], [7], [5, VOCAB + 2], [VOCAB + 1], [-1]])
    # Nothing generated yet: the prompt ends with 3 and 5, yet only the one-token word counts.
    assert banned_by(bad, [1, 3], 2) == {7}
    assert banned_by(bad, [1, 3, 3], 2) == {4, 7}
    assert banned_by(bad, [1, 5], 1) == {7}  # 5 then an id past the vocab: nothing to ban
    assert processors_for(SamplingParams()) == []
    [made] = processors_for(SamplingParams(bad_words_token_ids=[[7]]))
    assert isinstance(made, BadWords) and banned_by(made, [0], 1) == {7}


# ---- the sampler's hook ------------------------------------------------------------------------


def sampling_input(params: list[SamplingParams], rows: list[ProcessorRow]) -> SamplingInput:
    n = len(params)
    return SamplingInput.build(params, [11] * n, [1] * n, [[0]] * n, [[1]] * n, [], processors=rows)


def test_processors_apply_after_bias_and_before_the_argmax_and_the_draw() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    raw = logits.clone()
    bias = {int(raw[0].argmin()): 100.0}  # makes the worst token the best, then it is banned
    params = [
        SamplingParams(temperature=0.0, logit_bias=bias),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=2, seed=5),
        SamplingParams(temperature=1.0, top_k=2, seed=5, logprobs=0),
    ]
    rows = [
        ProcessorRow(0, BadWords([[t] for t in bias]), [0, 1], 1),
        ProcessorRow(2, BadWords([[int(raw[2].argmax())]]), [0, 1], 1),
        ProcessorRow(3, BadWords([[int(raw[3].argmax())]]), [0, 1], 1),
    ]
    tokens, logprobs = sample(logits, sampling_input(params, rows))
    plain, _ = sample(logits, sampling_input(params, []))
    assert torch.equal(logits, raw), "the input logits are left untouched"
    # Row 0: the biased token is banned, so the greedy pick is the raw best again.
    assert tokens[0].item() == raw[0].argmax().item()
    # Row 1 has no processor: the same token as in a batch without any.
    assert tokens[1].item() == plain[1].item() == raw[1].argmax().item()
    # Rows 2 and 3: top-2 of what is left, i.e. never the banned best, always one of the next two.
    for row in (2, 3):
        assert tokens[row].item() in raw[row].topk(3).indices[1:].tolist()
    # Logprobs stay those of the raw logits.
    assert logprobs[3].logprob == pytest.approx(raw[3].log_softmax(-1)[tokens[3]].item())
    assert sampling_input(params, []).processors == ()


# ---- the model runner: per-sequence processors, preemption -------------------------------------


class ConstantModel(torch.nn.Module):
    """Logits that always rank token 5 first and 7 second, whatever the input."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(input_ids), 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(hidden), VOCAB)
        logits[:, 5], logits[:, 7] = 2.0, 1.0
        return logits


def make_runner(samples: bool = True) -> ModelRunner:
    backend = SimpleNamespace(pool=SimpleNamespace(block_size=16), prepare=lambda metadata: None)
    return ModelRunner(ConstantModel(), backend, [0], torch.device("cpu"), samples=samples)


def arrive(runner: ModelRunner, step_id: int, tokens: list[int], prompt_len: int) -> int:
    """The sequence (re)arrives with `tokens` and is prefilled; returns its sampled token."""
    sampling = SamplingParams(temperature=0.0, bad_words_token_ids=[[5, 5]])
    plan = StepPlan(
        step_id=step_id,
        new_seqs=[NewSeq(1, tokens, prompt_len, sampling, seed=0)],
        seqs=[SeqStep(1, 0, len(tokens), new_block_ids=[0])],
    )
    return runner.execute(plan).token_ids[0]


def decode(runner: ModelRunner, step_id: int, token: int, start: int) -> int:
    plan = StepPlan(step_id=step_id, seqs=[SeqStep(1, start, 1, new_token_ids=[token])])
    return runner.execute(plan).token_ids[0]


def test_a_resumed_sequence_gets_its_processors_back_at_the_same_state() -> None:
    runner = make_runner()
    prompt = [1, 2, 3]
    first = arrive(runner, 0, prompt, 3)
    second = decode(runner, 1, first, 3)
    assert [first, second] == [5, 7], "never 5 twice in a row"
    # Preempted after generating 5: resumed with that token, its processor bans 5 at once.
    runner.execute(StepPlan(step_id=2, freed_seq_ids=[1]))
    assert 1 not in runner.seqs
    assert arrive(runner, 3, [*prompt, 5], 3) == 7
    # The word's prefix in the prompt does not count: a prompt ending with 5 may be followed by 5.
    runner.execute(StepPlan(step_id=4, freed_seq_ids=[1]))
    assert arrive(runner, 5, [1, 2, 5], 3) == 5


def test_ranks_that_do_not_sample_make_no_processors() -> None:
    runner = make_runner(samples=False)
    runner.execute(StepPlan(step_id=0, new_seqs=[NewSeq(1, [1], 1, SamplingParams(
        bad_words_token_ids=[[5]]), seed=0)]))  # fmt: skip
    assert runner.seqs[1].processors == []


# ---- the engine, preempting, against transformers ----------------------------------------------

MAX_NEW = 24


def hf_generate(
    model_dir: str, prompts: list[list[int]], bad: list[list[list[int]]]
) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy tokens and processed scores, each prompt with its bad words."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for prompt, words in zip(prompts, bad, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                do_sample=False, bad_words_ids=words or None, return_dict_in_generate=True,
                output_scores=True,
            )  # fmt: skip
        out.append((gen.sequences[0, len(prompt) :].tolist(), torch.cat(gen.scores)))
    return out


def test_engine_bans_bad_words_like_transformers_through_preemption(
    checkpoints: dict, workdir: str
) -> None:
    model_dir = checkpoints["llama"]
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (40, 60, 90, 120, 150, 200)]
    free = [tokens for tokens, _ in hf_generate(model_dir, prompts, [[]] * len(prompts))]
    # Ban what each prompt generated freely: a token at 3 and a pair at 8..9. transformers
    # also counts the prompt's tokens as a word's prefix, vLLM not: keep pairs off that border.
    bad = []
    for prompt, tokens in zip(prompts, free, strict=True):
        assert len(tokens) > 9 and tokens[8] != prompt[-1]
        bad.append([[tokens[3]], tokens[8:10]])
    refs = hf_generate(model_dir, prompts, bad)
    assert any(r[0] != f for r, f in zip(refs, free, strict=True)), "the bans changed nothing"
    requests = [
        (p, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, bad_words_token_ids=words))
        for p, words in zip(prompts, bad, strict=True)
    ]
    # 24 blocks of 16 tokens cannot hold all six: the newest get preempted and recomputed.
    with scheduler_and_workers(model_dir, workdir, block_size=16, num_kv_blocks=24) as eng:
        results, status = run_requests(eng["config"], requests)
    assert status.preemptions > 0, "the small cache was meant to force preemption"
    for i, (res, (ref_tokens, ref_scores)) in enumerate(zip(results, refs, strict=True)):
        assert res.error is None, res.error
        compare_greedy(f"request {i}", res.token_ids, ref_tokens, ref_scores)
