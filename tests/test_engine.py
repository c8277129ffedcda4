"""The engine as real processes (scheduler + worker over ZeroMQ) against transformers.

Greedy output must be token-identical to Hugging Face `generate` (float32, CPU) on the same
checkpoint, with 16 prompts of different lengths in flight at once: with a roomy cache and
chunked prefill, and with a cache so small that requests get preempted and recomputed.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
from hf_reference import compare_greedy, hf_greedy

from vlmserve.deploy.launcher import scheduler_and_workers
from vlmserve.frontend.offline import run_requests
from vlmserve.shared.messages import ERROR, SamplingParams

PROMPT_LENS = [3, 5, 8, 13, 17, 24, 31, 40, 55, 64, 80, 100, 128, 170, 230, 300]
MAX_NEW = 24
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


_references: dict[str, list] = {}


def reference(model_dir: str, prompts: list[list[int]]) -> list:
    if model_dir not in _references:
        _references[model_dir] = hf_greedy(model_dir, prompts, MAX_NEW)
    return _references[model_dir]


def assert_all_match(label: str, results: list, refs: list) -> None:
    for i, (res, (ref_tokens, ref_logits)) in enumerate(zip(results, refs, strict=True)):
        assert res.error is None, f"{label} request {i}: {res.error}"
        compare_greedy(
            f"{label} request {i} (prompt of {PROMPT_LENS[i]})",
            res.token_ids,
            ref_tokens,
            ref_logits,
        )


SCENARIOS = {
    # Roomy cache; the 230- and 300-token prompts exceed the 128-token step budget.
    "chunked": dict(max_batched_tokens=128, num_kv_blocks=512),
    # 40 blocks of 16 tokens cannot hold all 16 sequences: the newest get preempted.
    "preempted": dict(max_batched_tokens=512, num_kv_blocks=40),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_matches_transformers(
    checkpoints: dict, workdir: str, arch: str, scenario: str
) -> None:
    model_dir = checkpoints[arch]
    prompts = random_prompts(PROMPT_LENS, vocab=512, seed=1)
    refs = reference(model_dir, prompts)
    with scheduler_and_workers(model_dir, workdir, block_size=16, **SCENARIOS[scenario]) as eng:
        results, status = run_requests(eng["config"], [(p, GREEDY) for p in prompts])
    assert_all_match(f"{arch}/{scenario}", results, refs)
    if scenario == "preempted":
        assert status.preemptions > 0, "the small cache was meant to force preemption"


def test_seeded_sampling_is_reproducible_and_batch_independent(
    checkpoints: dict, workdir: str
) -> None:
    prompts = random_prompts([7, 19, 33], vocab=512, seed=2)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    others = [
        (p, SamplingParams(max_tokens=20, temperature=1.0))
        for p in random_prompts([11] * 6, 512, 3)
    ]
    with scheduler_and_workers(checkpoints["llama"], workdir, num_kv_blocks=256) as eng:
        alone = run_requests(eng["config"], [(prompts[0], seeded)])[0][0]
        again = run_requests(eng["config"], [(prompts[0], seeded)])[0][0]
        mixed = run_requests(eng["config"], others[:3] + [(prompts[0], seeded)] + others[3:])[0][3]
        other_seed = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=99)
        different = run_requests(eng["config"], [(prompts[0], other_seed)])[0][0]
    assert len(alone.token_ids) > 0
    assert again.token_ids == alone.token_ids, "same seed, same request: same tokens"
    assert mixed.token_ids == alone.token_ids, "other requests in the batch changed a seeded draw"
    assert different.token_ids != alone.token_ids, "a different seed gave the same 16 tokens"


def test_worker_death_fails_requests_and_stops_scheduler(checkpoints: dict, workdir: str) -> None:
    prompts = random_prompts([20] * 4, vocab=512, seed=4)
    long = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
    with scheduler_and_workers(
        checkpoints["llama"], workdir, num_kv_blocks=512, worker_timeout=2.0
    ) as eng:
        procs = eng["procs"]
        killer_started = []
        # The engine is up once it has answered: only then start the clock on the kill.
        run_requests(eng["config"], [(prompts[0], SamplingParams(max_tokens=2))], timeout=120)

        def kill_soon() -> None:
            time.sleep(1.5)  # the long requests are running by then
            killer_started.append(time.monotonic())
            os.kill(procs["worker0"].pid, signal.SIGKILL)

        threading.Thread(target=kill_soon, daemon=True).start()
        results, _ = run_requests(eng["config"], [(p, long) for p in prompts], timeout=60)
        failed_at = time.monotonic()
        scheduler_rc = procs["scheduler"].wait(timeout=10)
    for res in results:
        assert res.finish_reason == ERROR, f"expected an error finish, got {res.finish_reason}"
        assert "worker rank 0" in (res.error or ""), res.error
    assert failed_at - killer_started[0] < 5.0, (
        "requests not failed within 5 s of the worker's death"
    )
    assert scheduler_rc != 0, (
        "the scheduler must exit non-zero so its supervisor restarts the group"
    )
