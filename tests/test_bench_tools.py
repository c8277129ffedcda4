"""The benchmark's own tools (bench/ceiling.py, bench/peers.py, bench/vllm_peer.py), without
running a benchmark: the lean step computes real attention over its cache, the comparison's
ratios are ours over theirs, and vLLM's server is refused a head size its CPU kernels lack
before anything is installed. And one quick run of bench/family_bench.py on two families."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ceiling  # noqa: E402
import family_bench  # noqa: E402
import peers  # noqa: E402
import vllm_peer  # noqa: E402

from vlmserve.workers import demo_checkpoint  # noqa: E402

TINY = ceiling.Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                     vocab=100)  # fmt: skip


@pytest.mark.parametrize("attention", ["C kernels", "torch SDPA"])
def test_lean_decode_step_attends_over_its_cache(attention: str) -> None:
    """A decode at position n-1 after a prefill of n-1 tokens gives the logits a prefill of all
    n tokens gives its last one: the cache is written and read where it should be, by either
    attention the lean model runs (the engine's C kernels when they build, else SDPA)."""
    model = ceiling.LeanModel(TINY, batch=1, max_len=16)
    if attention == "torch SDPA":
        model.kernels = None
    else:
        assert model.kernels is not None, "the C kernels did not build here"
    x = torch.randn(9, TINY.hidden)
    whole = model.prefill(x)  # [1, vocab]
    model.prefill(x[:8])
    step = model.decode(x[8:9], pos=8)
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)
    # Without attention the step differs: the comparison above is not vacuous.
    assert not torch.allclose(model.decode(x[8:9], pos=8, attention=False), whole, atol=1e-3)


def test_ceiling_figures_and_workload_limit() -> None:
    r = ceiling.measure(TINY, [1, 2], context=8, prompt_len=8, output_len=4, repeats=2,
                        progress=lambda _: None)  # fmt: skip
    for b in (1, 2):
        assert r["decode_tok_s"][b] > 0 and r["gemms_only_tok_s"][b] > 0
        seconds = 2 * b * r["prefill_s"] + 2 * 3 * b / r["decode_tok_s"][b]
        assert r["workload_limit_tok_s"][b] == pytest.approx(2 * b * 4 / seconds)
    assert r["gemm_2048_gflops"] > 0


def round_result(tok_s: float, ttft_ms: float) -> dict:
    return {"output_throughput": tok_s, "median_ttft_ms": ttft_ms, "failed": 0, "errors": [],
            "short_outputs": 0, "long_outputs": 0, "prompt_tokens": 3600, "completed": 10,
            "load_avg_1m": 1.0}  # fmt: skip


def test_aggregate_gives_ours_over_each_peer() -> None:
    per_round = {
        "vlmserve": [round_result(100, 400), round_result(120, 600)],
        "vllm": [round_result(50, 1000), round_result(60, 1000)],
    }
    out = peers.aggregate(per_round)
    assert out["vlmserve"]["output_tok_s"] == 110 and out["vllm"]["output_tok_s"] == 55
    assert out["vllm"]["ours_over_this_tok_s"] == 2.0
    assert out["vllm"]["ours_over_this_ttft"] == 0.5
    assert out["vlmserve"]["prompt_tokens_per_request"] == 360
    assert "ours_over_this_tok_s" not in out["vlmserve"]


def test_vllm_server_refuses_head_dim_16_before_installing(tmp_path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2})
    )
    venv = tmp_path / "venv"
    with pytest.raises(ValueError, match="head_dim"):
        with vllm_peer.vllm_server(str(model), str(tmp_path), venv=str(venv)):
            pass
    assert not venv.exists()


def test_vllm_environment() -> None:
    env = vllm_peer.server_env("/nonexistent-venv", "0-1")
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert all(os.path.isfile(lib) for lib in env["LD_PRELOAD"].split(":") if lib)


def test_families_come_from_the_builder() -> None:
    families = family_bench.builder_families()
    assert {"llava", "qwen2_vl", "qwen2_5_vl", "internvl", "idefics3", "mistral3"} <= set(families)
    assert not set(families) & set(demo_checkpoint.ARCHES), families


FAMILY_FIGURES = (
    "requests_per_s", "output_tok_s", "ttft_p50_ms", "ttft_p95_ms", "prompt_tokens_per_request",
    "server_preprocess_ms_per_image", "alone_preprocess_ms_per_image",
)  # fmt: skip


def test_family_bench_quick_run_has_every_row(tmp_path) -> None:
    """Two families, 1 and 3 images, encoder cache on and off: every row is there, every
    request answered with exactly its tokens, every figure positive (no timing thresholds)."""
    out = tmp_path / "families.json"
    family_bench.main(["--quick", "--families", "llava,qwen2_vl", "--out", str(out)])
    report = json.loads(out.read_text())
    quick = family_bench.QUICK
    rows = {(r["family"], r["images_per_request"], r["encoder_cache"]): r for r in report["rows"]}
    expected = {(f, n, c) for f in ("llava", "qwen2_vl") for n in (1, 3) for c in ("on", "off")}
    assert set(rows) == expected and len(report["rows"]) == len(expected)
    for key, row in rows.items():
        assert row["failed"] == 0 and row["completed"] == quick["num_requests"], (key, row)
        assert row["output_tokens"] == quick["num_requests"] * quick["output_len"], (key, row)
        for figure in FAMILY_FIGURES:
            assert row[figure] > 0, (key, figure, row)
    for family in ("llava", "qwen2_vl"):
        # Three images take more prompt than one, and the cache changes no prompt.
        one, three = rows[family, 1, "on"], rows[family, 3, "on"]
        assert three["prompt_tokens_per_request"] > one["prompt_tokens_per_request"], family
        for n in (1, 3):
            on, off = rows[family, n, "on"], rows[family, n, "off"]
            assert on["prompt_tokens_per_request"] == off["prompt_tokens_per_request"], family
