"""The linear layers' CPU GEMM paths against plain torch.

`--cpu-gemm onednn` (the default) runs every linear layer, the LM head and the plain nn.Linear
layers of transformers' vision towers on a weight packed once by oneDNN, with the rows padded
to a bounded set of counts (oneDNN keeps kernels per row count); `--cpu-gemm aten` keeps
`F.linear`. Both must compute what `F.linear` does on the loaded weight: over batch sizes
0..360, with and without bias, float32 and bfloat16, tensor-parallel shards, a tied LM head,
and a whole model against transformers.
"""

from __future__ import annotations

import os

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
    gemm_rows,
    linear,
    onednn_packs,
    pack_linears,
    pack_nn_linear,
    pack_weight,
    warm_gemms,
)
from vlmserve.workers.loader import load_model

CPU = torch.device("cpu")
BATCHES = [0, 1, 3, 8, 33, 360]  # 33 and 360 run padded (to 36 and 384 rows)
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
    inputs = [
        torch.randn(2, 5, 64),
        torch.randn(3, 7, 64),  # 21 rows, padded to 22
        torch.randn(7, 128)[:, 32:96],
        torch.randn(64, 9).t(),
        torch.randn(40, 128)[:, 32:96],  # 40 rows of a slice, padded to 40: as they are
        torch.randn(3, 41, 64)[:, 1:],  # 120 rows, padded to 120, from a 3-D slice
    ]
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
    """A vision tower's nn.Linear: its forward swapped onto the packed weight (its loaded
    weight then released), and back to its own forward where nothing is packed."""
    layer = nn.Linear(64, 96, bias=bias).requires_grad_(False)
    tower = nn.Sequential(layer, nn.GELU())
    x = torch.randn(2, 7, 64)
    expected = F.linear(x, layer.weight, layer.bias)
    assert pack_linears(tower, "onednn") == 1 and "forward" in vars(layer)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.weight.untyped_storage().nbytes() == layer.weight.element_size()
    other = nn.Linear(64, 96, bias=bias).requires_grad_(False)
    assert pack_nn_linear(other, "onednn") and "forward" in vars(other)
    assert not pack_nn_linear(other, "aten") and "forward" not in vars(other)
    assert torch.equal(other(x), F.linear(x, other.weight, other.bias))


def test_gemm_rows_are_few_and_close_above() -> None:
    """Row counts up to 16 as they are; above, at most 1/8 more rows; 72 counts up to 2048."""
    counts = [gemm_rows(m) for m in range(0, 5000)]
    assert counts[:17] == list(range(17))
    assert all(m <= c <= m * 9 / 8 for m, c in enumerate(counts) if m)
    assert all(gemm_rows(c) == c for c in counts)  # a padded count is its own bucket
    assert len(set(counts[1:2049])) == 72 and len(set(counts[1:])) == 82


class GemmCalls:
    """oneDNN's linear calls of a test, recorded by (weight shape, rows)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[tuple[int, ...], int]] = []
        run = torch.ops.mkldnn._linear_pointwise

        def record(x: torch.Tensor, packed: torch.Tensor, *args: object) -> torch.Tensor:
            self.seen.append((tuple(packed.shape), x.shape[0]))
            return run(x, packed, *args)

        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", record)


def test_onednn_sees_only_bucketed_row_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row count from 1 to 300 reaches oneDNN as one of 50 counts."""
    calls = GemmCalls(monkeypatch)
    layer = random_layer(24, 16, True, torch.float32)
    layer.pack("onednn")
    for m in range(1, 301):
        x = torch.randn(m, 16)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    rows = [r for _, r in calls.seen]
    assert len(rows) == 300 and rows == [gemm_rows(m) for m in range(1, 301)]
    assert len(set(rows)) == 16 + 8 * 4 + 2  # 1..16, 18..32 by 2, ..., 136..256 by 16, 288, 320


def test_warm_gemms_builds_each_shape_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One GEMM per distinct (weight shape, bias, row count), layers of one shape shared, the
    LM head up to its own row limit; a step of any size afterwards runs one of them."""
    model = nn.Sequential(
        MergedColumnParallelLinear(32, [48, 48]),
        MergedColumnParallelLinear(32, [48, 48]),  # same GEMM as the first
        RowParallelLinear(96, 32, bias=True),  # its bias is added after the GEMM
        LinearBase(32, 32, bias=True),
        ParallelLMHead(50, 32),
        nn.Linear(32, 8),  # a tower's layer: its row counts are the images', not warmed
    )
    assert pack_linears(model, "onednn") == 6
    calls = GemmCalls(monkeypatch)
    built = warm_gemms(model, max_rows=100, max_logit_rows=20)
    to_100, to_20 = (len({gemm_rows(m) for m in range(1, top + 1)}) for top in (100, 20))
    assert built == 3 * to_100 + to_20 == len(calls.seen) == len(set(calls.seen))
    warmed = set(calls.seen)
    assert {shape for shape, _ in warmed} == {(96, 32), (32, 96), (32, 32), (50, 32)}
    calls.seen.clear()
    for m in (1, 7, 17, 33, 99, 100):
        for layer in model[:4]:
            layer(torch.randn(m, layer.weight.shape[1]))
    for m in (1, 13, 20):
        model[4].compute_logits(torch.randn(m, 32))
    assert calls.seen and set(calls.seen) <= warmed
    assert warm_gemms(nn.Sequential(LinearBase(32, 32, bias=False)), 100, 20) == 0  # unpacked


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_memory_stays_flat_over_new_step_sizes() -> None:
    """The cause of issue 10's growth, bounded: oneDNN keeps a few hundred KiB per row count it
    ran a weight at. After warm_gemms, the 400 row counts up to 400 add ~2.6 MB (measured here);
    bucketed but not warmed, 33 MB; neither, ~600 KiB each (~240 MB)."""
    weight = torch.randn(72, 40)  # a shape no other test runs, so no kernel of it is cached
    packed = pack_weight(weight, "onednn")
    layer = nn.Module()
    layer.weight, layer.bias, layer.packed = weight, None, packed
    with torch.inference_mode():
        warm_gemms(layer, max_rows=400, max_logit_rows=1)
        linear(torch.randn(400, 40), weight, None, packed)
        before = rss_kib()
        for m in np.random.default_rng(0).permutation(np.arange(1, 401)):
            linear(torch.randn(int(m), 40), weight, None, packed)
    assert rss_kib() - before < 12 * 1024, f"{rss_kib() - before} KiB more"


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


def test_packed_layers_release_their_loaded_weights_unless_tied(tmp_path) -> None:  # noqa: ANN001
    """After oneDNN packs a layer, its loaded weight is dropped (one copy of each GEMM weight in
    memory, not two), keeping shape, dtype and device; a tied LM head's weight, the embedding
    table, keeps its values; and the model still computes what the unpacked one does."""
    model_dir = build_checkpoint(str(tmp_path / "qwen2"), arch="qwen2")
    cpu = torch.device("cpu")
    packed = load_model(model_dir, torch.float32, cpu, "onednn")
    plain = load_model(model_dir, torch.float32, cpu, "aten")
    layer = packed.model.layers[0].mlp.gate_up_proj
    assert layer.packed is not None
    assert layer.weight.untyped_storage().nbytes() == layer.weight.element_size()
    assert layer.weight.shape == plain.model.layers[0].mlp.gate_up_proj.weight.shape
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    torch.testing.assert_close(packed.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    ids = torch.arange(3, 40)
    meta = build_metadata([0], [len(ids)], [list(range(3))], 16, cpu)
    outs = []
    for model in (packed, plain):
        pool = KVPool.for_model(model, 3, 16, torch.float32, cpu)
        with torch.inference_mode(), step_context(meta, TorchBackend(pool)):
            outs.append(model.compute_logits(model(ids, meta.positions)))
    assert not outs[0].isnan().any(), "a released weight was read"
    torch.testing.assert_close(outs[0], outs[1], **TOLERANCE[torch.float32])
