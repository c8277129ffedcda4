"""Small steps on one CPU thread (workers/cpu_threads.py): which steps, the kernels built for
them, and that one thread computes what all of them do."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from vlmserve.workers import cpu_threads
from vlmserve.workers.attention.context import step_context
from vlmserve.workers.attention.metadata import build_metadata
from vlmserve.workers.attention.torch_backend import TorchBackend
from vlmserve.workers.cpu_threads import SMALL_STEP_MACS, StepThreads, macs_per_token
from vlmserve.workers.demo_checkpoint import build_checkpoint
from vlmserve.workers.kv_pool import KVPool
from vlmserve.workers.layers import linear as linear_module
from vlmserve.workers.loader import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_checkpoint(str(tmp_path_factory.mktemp("threads") / "qwen2"), arch="qwen2")


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The worker's own count is 2 here whatever the machine has; the test's is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_macs_per_token_are_the_decoders_gemm_weights(tiny: str) -> None:
    """Counted from config.json: each layer's q, k, v, o, gate, up and down projections and
    the LM head; not the embedding table, which is a lookup."""
    with open(os.path.join(tiny, "config.json")) as f:
        c = json.load(f)
    h, i, layers, vocab = (c[k] for k in ("hidden_size", "intermediate_size",
                                          "num_hidden_layers", "vocab_size"))  # fmt: skip
    head_dim = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i
    model = load_model(tiny, torch.float32, CPU, "onednn")
    assert macs_per_token(model) == layers * per_layer + vocab * h


def test_small_steps_take_one_thread_others_all(tiny: str, two_threads: None) -> None:
    model = load_model(tiny, torch.float32, CPU, "onednn")
    threads = StepThreads(model, CPU)
    small = SMALL_STEP_MACS // macs_per_token(model)
    assert threads.small_tokens == small >= 1  # the tiny model's decode steps are small
    for tokens, expected in [(1, 1), (small, 1), (small + 1, 2), (1, 1), (10 * small, 2)]:
        threads.set_for(tokens)
        assert torch.get_num_threads() == expected, f"{tokens} tokens"


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_other_devices_keep_their_threads(tiny: str, two_threads: None, device: str) -> None:
    model = load_model(tiny, torch.float32, CPU, "onednn")
    threads = StepThreads(model, torch.device(device))
    threads.set_for(1)
    assert threads.small_tokens == 0 and torch.get_num_threads() == 2


def test_a_one_thread_worker_has_nothing_to_share(tiny: str) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        threads = StepThreads(load_model(tiny, torch.float32, CPU, "onednn"), CPU)
        assert threads.small_tokens == 0
        threads.set_for(10**6)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_big_model_never_drops_to_one_thread(
    tiny: str, two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose single token exceeds the bound (the q30m: 30 M multiply-adds) keeps every
    thread even at batch 1."""
    model = load_model(tiny, torch.float32, CPU, "onednn")
    monkeypatch.setattr(cpu_threads, "SMALL_STEP_MACS", macs_per_token(model) - 1)
    threads = StepThreads(model, CPU)
    threads.set_for(1)
    assert threads.small_tokens == 0 and torch.get_num_threads() == 2


def test_warm_builds_the_small_row_counts_on_one_thread(
    tiny: str, two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """oneDNN builds kernels per thread count: the one-thread ones for every row count a small
    step can have (the LM head's up to its own limit), then the worker's count is back."""
    model = load_model(tiny, torch.float32, CPU, "onednn")
    threads = StepThreads(model, CPU)
    seen: list[tuple[int, int]] = []
    run = linear_module.linear

    def record(x: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append((x.shape[0], torch.get_num_threads()))
        return run(x, *args)

    monkeypatch.setattr(linear_module, "linear", record)
    built = threads.warm(model, max_logit_rows=4)
    assert built == len(seen) > 0
    assert {n for _, n in seen} == {1} and torch.get_num_threads() == 2
    rows = {r for r, _ in seen}
    assert rows == {linear_module.gemm_rows(m) for m in range(1, threads.small_tokens + 1)}


def test_one_thread_computes_what_two_do(tiny: str, two_threads: None) -> None:
    """A prefill's logits on one thread and on two: oneDNN splits rows and columns between
    threads, not the sums, so they are the same numbers."""
    model = load_model(tiny, torch.float32, CPU, "onednn")
    backend = TorchBackend(KVPool.for_model(model, 16, 16, torch.float32, CPU))
    ids = torch.tensor(np.random.default_rng(0).integers(3, 500, 40))
    metadata = build_metadata([0], [len(ids)], [list(range(16))], 16, CPU)

    def logits() -> torch.Tensor:
        with torch.no_grad(), step_context(metadata, backend):
            return model.compute_logits(model(ids, metadata.positions))

    two = logits()
    torch.set_num_threads(1)
    torch.testing.assert_close(logits(), two, rtol=0, atol=0)
