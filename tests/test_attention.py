"""The torch attention backend against dense causal attention in plain torch, and its seams.

A step mixes what the engine sends: decodes of different context lengths (more than one
decode group), fresh prefills, one-token prompts and prefill chunks after a cached prefix,
over block tables scattered across the pool. Each sequence's output must equal softmax
attention over its whole history, computed densely; the cached prefixes are written by an
earlier step through the same backend.
"""

from __future__ import annotations

import pytest
import torch

from vlmserve.workers.attention.context import current, step_context
from vlmserve.workers.attention.metadata import build_metadata
from vlmserve.workers.attention.registry import attention_backend
from vlmserve.workers.attention.torch_backend import DECODE_GROUP, TorchBackend
from vlmserve.workers.kv_pool import KVPool
from vlmserve.workers.layers.attention import PagedAttention

CPU = torch.device("cpu")
# (tokens cached before the step, tokens computed in it), decodes first as the runner orders.
DECODES = [(5, 1), (0, 1), (40, 1), (17, 1), (3, 1), (33, 1), (16, 1), (8, 1), (1, 1), (64, 1)]
PREFILLS = [(0, 23), (0, 1), (9, 6), (32, 17), (0, 2), (4, 1 + 15)]
SEQS = DECODES + PREFILLS


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [q_len, heads, dim], the last q_len of k, v: [ctx, kv_heads, dim]; causal."""
    q_len, ctx = q.shape[0], k.shape[0]
    ratio = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(ratio, dim=1), v.repeat_interleave(ratio, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    future = torch.arange(ctx)[None, :] > torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(future, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def scattered_block_tables(lengths: list[int], block_size: int, num_blocks: int) -> list[list]:
    """Each sequence's blocks drawn from a shuffled pool, so tables are not contiguous."""
    free = torch.randperm(num_blocks).tolist()
    tables = []
    for length in lengths:
        need = -(-length // block_size)
        tables.append([free.pop() for _ in range(need)])
    return tables


def run_step(
    backend: TorchBackend,
    layer: PagedAttention,
    spans: list[tuple[int, int]],
    tables: list[list[int]],
    qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> list[torch.Tensor]:
    """Compute positions [start, start + n) of each sequence; its outputs, per sequence."""
    metadata = build_metadata(
        [s for s, _ in spans], [n for _, n in spans], tables, backend.pool.block_size, CPU
    )
    rows = [[t[s : s + n] for t in seq] for seq, (s, n) in zip(qkv, spans, strict=True)]
    q, k, v = (torch.cat(part) for part in zip(*rows, strict=True))  # [tokens, heads, dim]
    with step_context(metadata, backend):
        out = layer(q, k, v)
    return list(out.split([n for _, n in spans]))


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_torch_backend_equals_dense_attention(
    num_kv_heads: int, gqa: int, head_dim: int, block_size: int
) -> None:
    torch.manual_seed(0)
    num_heads, scale = num_kv_heads * gqa, head_dim**-0.5
    lengths = [start + n for start, n in SEQS]
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    pool = KVPool(2, num_kv_heads, head_dim, num_blocks, block_size, torch.float32, CPU)
    backend = TorchBackend(pool)
    layer = PagedAttention(num_heads, num_kv_heads, head_dim, scale, layer_idx=1)
    tables = scattered_block_tables(lengths, block_size, num_blocks)
    qkv = [
        (
            torch.randn(n, num_heads, head_dim),
            torch.randn(n, num_kv_heads, head_dim),
            torch.randn(n, num_kv_heads, head_dim),
        )
        for n in lengths
    ]
    # Step 1 caches every prefix (fresh prefills, decodes first as the runner orders them).
    cached = [(i, start) for i, (start, _) in enumerate(SEQS) if start > 0]
    cached.sort(key=lambda item: item[1] != 1)
    first = run_step(
        backend,
        layer,
        [(0, start) for _, start in cached],
        [tables[i] for i, _ in cached],
        [qkv[i] for i, _ in cached],
    )
    # Step 2: the mixed batch over those prefixes.
    second = run_step(backend, layer, SEQS, tables, qkv)
    assert len(DECODES) > DECODE_GROUP, "the decodes must span more than one group"
    for (i, start), out in zip(cached, first, strict=True):
        q, k, v = (t[:start] for t in qkv[i])
        torch.testing.assert_close(out, dense_attention(q, k, v, scale))
    for (start, n), (q, k, v), out in zip(SEQS, qkv, second, strict=True):
        expected = dense_attention(q[start : start + n], k, v, scale)
        torch.testing.assert_close(out, expected, msg=lambda m, s=(start, n): f"seq {s}: {m}")
    assert not pool.cache[0].any(), "only layer 1's cache is written"


def test_metadata_of_a_mixed_step() -> None:
    # Decodes at positions 5 and 2, then a chunk of 3 after 4 cached tokens, block size 4.
    tables = [[7, 2], [5], [1, 9, 3]]
    meta = build_metadata([5, 2, 4], [1, 1, 3], tables, 4, CPU)
    assert meta.query_start_loc.tolist() == [0, 1, 2, 5]
    assert meta.query_start_loc.dtype == torch.int32
    assert meta.seq_lens.tolist() == [6, 3, 7]
    assert meta.block_tables.tolist() == [[7, 2], [5, 0], [1, 9]]
    assert meta.block_tables.dtype == torch.int32
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 5 * 4 + 2, 9 * 4 + 0, 9 * 4 + 1, 9 * 4 + 2]
    assert meta.slot_mapping.dtype == torch.int64
    assert meta.positions.tolist() == [5, 2, 4, 5, 6]
    assert (meta.num_seqs, meta.num_decodes, meta.num_tokens) == (3, 2, 5)
    assert (meta.max_query_len, meta.max_seq_len) == (3, 7)


def test_step_context_refuses_nesting_and_absence() -> None:
    pool = KVPool(1, 1, 8, 4, 4, torch.float32, CPU)
    meta = build_metadata([0], [3], [[0]], 4, CPU)
    with pytest.raises(RuntimeError, match="no forward context"):
        current()
    with step_context(meta, TorchBackend(pool)) as ctx:
        assert current() is ctx
        with pytest.raises(RuntimeError, match="already active"), step_context(meta, ctx.backend):
            pass
    with pytest.raises(RuntimeError, match="no forward context"):
        current()


def test_registry_names_torch_and_refuses_unknown_names() -> None:
    assert attention_backend("torch") is TorchBackend
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; available: torch"):
        attention_backend("flash")
