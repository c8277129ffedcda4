"""Prompt logprobs (vLLM's `prompt_logprobs`) against transformers, through the real engine.

Each prompt token's logprob must equal `log_softmax(model(input_ids).logits)` at the position
before it, gathered at the token, with its rank and the top N at that position; with chunked
prefill (a step budget smaller than the prompts) and with the prompt's prefix already cached.
"""

from __future__ import annotations

import random

import torch
import transformers

from vlmserve.deploy.launcher import scheduler_and_workers
from vlmserve.frontend.offline import Finished, run_requests
from vlmserve.shared.messages import PromptLogprobs, SamplingParams

TOLERANCE = 1e-4


def random_prompt(length: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, 512) for _ in range(length)]


def hf_prompt_logprobs(model: transformers.PreTrainedModel, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i is the distribution that prompt token i + 1 came from."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()  # [len, vocab]
    return torch.log_softmax(logits, dim=-1)[:-1]


def assert_matches(label: str, got: PromptLogprobs, prompt: list[int], ref: torch.Tensor) -> None:
    """Compare every position; report the first that differs."""
    assert len(got.logprobs) == len(prompt) - 1, f"{label}: {len(got.logprobs)} positions"
    targets = torch.tensor(prompt[1:])
    ref_chosen = ref.gather(1, targets.unsqueeze(1)).squeeze(1)
    ref_ranks = (ref >= ref_chosen.unsqueeze(1)).sum(dim=-1)
    for pos in range(len(prompt) - 1):
        where = f"{label}: first difference at prompt token {pos + 1}"
        diff = abs(got.logprobs[pos] - ref_chosen[pos].item())
        assert diff < TOLERANCE, f"{where}: logprob {got.logprobs[pos]} vs {ref_chosen[pos]}"
        # A rank may differ only where another token is within the tolerance of this one.
        near = ((ref[pos] - ref_chosen[pos]).abs() < TOLERANCE).sum().item()
        assert abs(got.ranks[pos] - ref_ranks[pos].item()) < near, (
            f"{where}: rank {got.ranks[pos]} vs {ref_ranks[pos].item()}"
        )
        n = len(got.top_ids[pos])
        values, ids = ref[pos].topk(n)
        torch.testing.assert_close(
            torch.tensor(got.top_logprobs[pos]), values, atol=TOLERANCE, rtol=0, msg=where
        )
        gaps = torch.cat([values[:-1] - values[1:], torch.tensor([1.0])]) if n else values
        for k in range(n):  # the order of near-ties may differ
            if gaps[k] > TOLERANCE and (k == 0 or gaps[k - 1] > TOLERANCE):
                assert got.top_ids[pos][k] == ids[k].item(), f"{where}: top {k} id"


def run(config: object, requests: list[tuple[list[int], SamplingParams]]) -> list[Finished]:
    results, _ = run_requests(config, requests)
    for res in results:
        assert res.error is None, res.error
    return results


def test_prompt_logprobs_match_transformers_chunked_and_after_a_cached_prefix(
    checkpoints: dict, workdir: str
) -> None:
    model_dir = checkpoints["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    rng = random.Random(11)
    prompts = [random_prompt(n, rng) for n in (1, 2, 17, 40, 90)]
    asks = [SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=n) for n in (5, 0, 3)]
    # A 32-token step budget cuts the 40- and 90-token prompts into chunks (and runs the
    # five prompts' chunks side by side, with requests that ask for nothing).
    settings = dict(block_size=16, max_batched_tokens=32, max_batch_size=16, num_kv_blocks=256)
    with scheduler_and_workers(model_dir, workdir, **settings) as eng:
        plain = SamplingParams(max_tokens=2, temperature=0.0)
        requests = [(p, asks[i % 3]) for i, p in enumerate(prompts)] + [(prompts[3], plain)]
        results = run(eng["config"], requests)
        # Then the 90-token prompt again, now cached: a request that asks for prompt
        # logprobs does not take the cached blocks (they have no logits), others still do.
        again = run(eng["config"], [(prompts[4], plain)])[0]
        cached = run(eng["config"], [(prompts[4], asks[0])])[0]
    assert results[-1].prompt_logprobs is None, "a request that did not ask got them"
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=False)):
        assert res.prompt_logprobs is not None, f"prompt {i} got no prompt logprobs"
        num_top = asks[i % 3].prompt_logprobs
        assert all(len(ids) == num_top for ids in res.prompt_logprobs.top_ids)
        assert_matches(f"prompt {i} ({len(prompt)} tokens)", res.prompt_logprobs, prompt,
                       hf_prompt_logprobs(model, prompt))  # fmt: skip
    assert again.num_cached_tokens >= 80, "the second run of the prompt was meant to hit the cache"
    assert cached.num_cached_tokens == 0
    assert cached.token_ids == results[4].token_ids
    assert cached.prompt_logprobs is not None
    assert_matches("cached prompt", cached.prompt_logprobs, prompts[4],
                   hf_prompt_logprobs(model, prompts[4]))  # fmt: skip
