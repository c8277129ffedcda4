"""The linear layers' CPU GEMM paths against plain torch.

`--cpu-gemm onednn` (opt-in: the worker's RSS grows under tests/test_soak.py's load) runs every
linear layer, the LM head and the plain nn.Linear layers of transformers' vision towers on a
weight packed once by oneDNN; `--cpu-gemm aten` (the default) keeps `F.linear`. Both must
compute what `F.linear` does on the loaded weight: over batch sizes 0..360, with and without
bias, float32 and bfloat16, tensor-parallel shards, a tied LM head, and a whole model against
transformers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from vlmserve.shared.config import Config
from vlmserve.shared.messages import SamplingParams
from vlmserve.workers.attention.context import step_context
from vlmserve.workers.attention.metadata import build_metadata
from vlmserve.workers.attention.torch_backend import TorchBackend
from vlmserve.workers.demo_checkpoint import build_checkpoint
from vlmserve.workers.kv_pool import KVPool
from vlmserve.workers.layers import linear as linear_module
from vlmserve.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vlmserve.workers.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    onednn_packs,
    pack_linears,
    pack_weight,
)
from vlmserve.workers.loader import load_model

CPU = torch.device("cpu")
BATCHES = [0, 1, 3, 8, 33, 360]
# (out, in): the q30m's QKV and down projections, and odd sizes no kernel tiles evenly.
SIZES = [(768, 512), (512, 1024), (37, 19)]
# oneDNN sums in another order than MKL: float32 agrees to rounding, bfloat16 to its own.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def random_layer(out_features: int, in_features: int, bias: bool, dtype: torch.dtype) -> LinearBase:
    g = torch.Generator().manual_seed(out_features * in_features)
    layer = LinearBase(in_features, out_features, bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.05)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=g))
    return layer.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("out_features", "in_features"), SIZES)
def test_onednn_linear_matches_f_linear(
    out_features: int, in_features: int, bias: bool, dtype: torch.dtype
) -> None:
    layer = random_layer(out_features, in_features, bias, dtype)
    assert layer.pack("onednn") == onednn_packs(layer.weight)
    if dtype == torch.float32:  # every x86 or Arm build of torch has oneDNN for float32
        assert layer.packed is not None
    for m in BATCHES:
        x = torch.randn(m, in_features).to(dtype)
        with torch.inference_mode():
            torch.testing.assert_close(
                layer(x), F.linear(x, layer.weight, layer.bias), **TOLERANCE[dtype]
            )


def test_onednn_linear_takes_any_input_layout() -> None:
    """Inputs as the models hand them over: 3-D, column slices of a wider tensor, transposed."""
    layer = random_layer(96, 64, True, torch.float32)
    layer.pack("onednn")
    inputs = [torch.randn(2, 5, 64), torch.randn(7, 128)[:, 32:96], torch.randn(64, 9).t()]
    for x in inputs:
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_aten_keeps_f_linear() -> None:
    layer = random_layer(768, 512, True, torch.float32)
    assert layer.pack("aten") is False and layer.packed is None
    x = torch.randn(8, 512)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_a_pack_is_the_weight_as_loaded_when_packed() -> None:
    """Packing copies: a layer packed again after new weights load computes with the new ones."""
    layer = random_layer(64, 32, False, torch.float32)
    layer.pack("onednn")
    x = torch.randn(4, 32)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)
    torch.testing.assert_close(layer(x), before)
    layer.pack("onednn")
    torch.testing.assert_close(layer(x), 2 * before)


def test_unknown_cpu_gemm_is_refused() -> None:
    with pytest.raises(ValueError, match="cpu_gemm must be one of onednn, aten"):
        pack_weight(torch.zeros(4, 4), "mkl")
    with pytest.raises(ValueError, match="--cpu-gemm must be onednn or aten"):
        Config(cpu_gemm="mkl")


@pytest.fixture
def rank_1_of_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build layers as rank 1 of 2 would (their shards); collectives stay local (one process)."""
    monkeypatch.setattr(linear_module, "tp_size", lambda: 2)
    monkeypatch.setattr(linear_module, "tp_rank", lambda: 1)


@pytest.mark.parametrize("cpu_gemm", ["onednn", "aten"])
def test_tensor_parallel_shards(rank_1_of_2: None, cpu_gemm: str) -> None:
    """Each layer type loads rank 1's slice of whole checkpoint weights and computes with it."""
    g = torch.Generator().manual_seed(0)
    hidden, inter, head_dim, heads, kv_heads = 64, 96, 16, 4, 2
    x = torch.randn(5, hidden, generator=g)

    gate, up = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g)
    merged = MergedColumnParallelLinear(hidden, [inter, inter])
    merged.weight_loader(merged.weight, gate, 0)
    merged.weight_loader(merged.weight, up, 1)
    half = inter // 2
    expected = torch.cat([x @ gate[half:].T, x @ up[half:].T], dim=-1)

    q, k, v = (torch.randn(n * head_dim, hidden, generator=g) for n in (heads, kv_heads, kv_heads))
    qb, kb, vb = (torch.randn(w.shape[0], generator=g) for w in (q, k, v))
    qkv = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True)
    for shard, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
        qkv.weight_loader(qkv.weight, w, shard)
        qkv.weight_loader(qkv.bias, b, shard)
    rows_q, rows_kv = slice(2 * head_dim, 4 * head_dim), slice(head_dim, 2 * head_dim)
    expected_qkv = torch.cat(
        [
            x @ q[rows_q].T + qb[rows_q],
            x @ k[rows_kv].T + kb[rows_kv],
            x @ v[rows_kv].T + vb[rows_kv],
        ],
        dim=-1,
    )

    o, ob = torch.randn(hidden, heads * head_dim, generator=g), torch.randn(hidden, generator=g)
    row = RowParallelLinear(heads * head_dim, hidden, bias=True, shard=qkv.out_shard)
    row.weight_loader(row.weight, o)
    row.weight_loader(row.bias, ob)
    attn = torch.randn(5, qkv.q_size, generator=g)
    expected_row = attn @ o[:, rows_q].T + ob  # this rank's partial sum (no other rank here)

    for layer in (merged, qkv, row):
        assert layer.pack(cpu_gemm) == (cpu_gemm == "onednn")
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv(x), expected_qkv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row(attn), expected_row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cpu_gemm", ["onednn", "aten"])
def test_tied_lm_head(cpu_gemm: str) -> None:
    """A packed LM head sharing the embedding's weight: lookups still read the parameter."""
    embed = VocabParallelEmbedding(300, 48)
    head = ParallelLMHead(300, 48)
    with torch.no_grad():
        embed.weight.copy_(torch.randn(300, 48))
    head.weight = embed.weight
    assert head.pack(cpu_gemm) == (cpu_gemm == "onednn")
    ids = torch.tensor([0, 7, 299])
    assert torch.equal(embed(ids), embed.weight[ids])
    hidden = torch.randn(3, 48)
    torch.testing.assert_close(
        head.compute_logits(hidden), F.linear(hidden, embed.weight), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bias", [True, False])
def test_transformers_nn_linear_runs_packed(bias: bool) -> None:
    """A vision tower's nn.Linear: its forward swapped onto the packed weight, and back."""
    layer = nn.Linear(64, 96, bias=bias).requires_grad_(False)
    tower = nn.Sequential(layer, nn.GELU())
    x = torch.randn(2, 7, 64)
    expected = F.linear(x, layer.weight, layer.bias)
    assert pack_linears(tower, "onednn") == 1 and "forward" in vars(layer)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert pack_linears(tower, "aten") == 0 and "forward" not in vars(layer)
    assert torch.equal(layer(x), expected)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_checkpoint(str(tmp_path_factory.mktemp("linear") / "qwen2"), arch="qwen2")


@pytest.mark.parametrize("cpu_gemm", ["onednn", "aten"])
def test_model_logits_equal_transformers(qwen2: str, cpu_gemm: str) -> None:
    """A whole prefill's logits under either kernel: as transformers' forward (float32)."""
    ours = load_model(qwen2, torch.float32, CPU, cpu_gemm)
    packed = [m for m in ours.modules() if getattr(m, "packed", None) is not None]
    assert (len(packed) > 0) == (cpu_gemm == "onednn")
    backend = TorchBackend(KVPool.for_model(ours, 16, 16, torch.float32, CPU))
    ids = torch.tensor(np.random.default_rng(0).integers(3, 512, 100))
    metadata = build_metadata([0], [len(ids)], [list(range(16))], 16, CPU)
    with torch.no_grad(), step_context(metadata, backend):
        logits = ours.compute_logits(ours(ids, metadata.positions))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(qwen2, dtype=torch.float32)
    with torch.no_grad():
        expected = theirs(ids[None]).logits[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_engine_with_cpu_gemm_onednn(qwen2: str, tmp_path) -> None:  # noqa: ANN001
    """The flag reaches the worker: an engine on --cpu-gemm onednn answers as transformers."""
    from hf_reference import compare_greedy, hf_greedy

    from vlmserve.deploy.launcher import scheduler_and_workers
    from vlmserve.frontend.offline import run_requests

    prompts = [[5, 9, 200, 17], list(range(3, 40))]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    with scheduler_and_workers(qwen2, str(tmp_path), device="cpu", cpu_gemm="onednn") as eng:
        assert eng["config"].cpu_gemm == "onednn"
        results, _ = run_requests(eng["config"], [(p, greedy) for p in prompts])
        with open(eng["log"]) as f:
            log = f.read()
    assert "worker rank 0" in log and "for oneDNN" in log  # it logs its packing
    for i, (result, (ref, ref_logits)) in enumerate(
        zip(results, hf_greedy(qwen2, prompts, 8), strict=True)
    ):
        assert len(result.token_ids) == 8
        compare_greedy(f"prompt {i}", result.token_ids, ref, ref_logits)
