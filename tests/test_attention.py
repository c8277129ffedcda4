"""Every attention backend against dense causal attention in plain torch and against the
torch reference backend, and the seams around them.

A step mixes what the engine sends: decodes of different context lengths (more than one
decode group), fresh prefills, one-token prompts and prefill chunks after a cached prefix,
over block tables scattered across the pool. Each sequence's output must equal softmax
attention over its whole history, computed densely; the cached prefixes are written by an
earlier step through the same backend. A longer run chunks prompts over several steps
while others decode, and every backend must give the reference backend's outputs and cache.
"""

from __future__ import annotations

import pytest
import torch

from vlmserve.shared.config import Config
from vlmserve.workers.attention import sdpa_backend, torch_backend
from vlmserve.workers.attention.backend import AttentionBackend
from vlmserve.workers.attention.context import current, step_context
from vlmserve.workers.attention.metadata import build_metadata
from vlmserve.workers.attention.registry import BACKENDS, attention_backend
from vlmserve.workers.attention.sdpa_backend import SdpaBackend
from vlmserve.workers.attention.torch_backend import TorchBackend
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
    backend: AttentionBackend,
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
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_equals_dense_attention(
    name: str, num_kv_heads: int, gqa: int, head_dim: int, block_size: int
) -> None:
    torch.manual_seed(0)
    num_heads, scale = num_kv_heads * gqa, head_dim**-0.5
    lengths = [start + n for start, n in SEQS]
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    pool = KVPool(2, num_kv_heads, head_dim, num_blocks, block_size, torch.float32, CPU)
    backend = attention_backend(name)(pool)
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
    groups = max(torch_backend.DECODE_GROUP, sdpa_backend.DECODE_GROUP)
    assert len(DECODES) > groups, "the decodes must span more than one group"
    for (i, start), out in zip(cached, first, strict=True):
        q, k, v = (t[:start] for t in qkv[i])
        torch.testing.assert_close(out, dense_attention(q, k, v, scale))
    for (start, n), (q, k, v), out in zip(SEQS, qkv, second, strict=True):
        expected = dense_attention(q[start : start + n], k, v, scale)
        torch.testing.assert_close(out, expected, msg=lambda m, s=(start, n): f"seq {s}: {m}")
    assert not pool.cache[0].any(), "only layer 1's cache is written"


def engine_steps(
    prompts: list[int], outputs: list[int], budget: int
) -> list[list[tuple[int, int, int]]]:
    """The steps an engine would run: (sequence, start, tokens) each, decodes first.

    Every step decodes the sequences whose prompts are done, then spends what is left of
    `budget` on prompts in arrival order, chunking the one it runs out on.
    """
    done = [0] * len(prompts)
    steps = []
    while any(d < p + o - 1 for d, p, o in zip(done, prompts, outputs, strict=True)):
        decodes, chunks, left = [], [], budget
        for i, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
            if p <= done[i] < p + o - 1:
                decodes.append((i, done[i], 1))
                left -= 1
        for i, p in enumerate(prompts):
            if done[i] < p and left > 0:
                n = min(p - done[i], left)
                chunks.append((i, done[i], n))
                left -= n
        for i, start, n in decodes + chunks:
            done[i] = start + n
        steps.append(decodes + chunks)
    return steps


@pytest.mark.parametrize(
    ("num_kv_heads", "gqa", "head_dim", "block_size"),
    [(2, 4, 64, 16), (1, 8, 32, 5), (4, 1, 80, 32), (2, 3, 16, 1)],
)
@pytest.mark.parametrize("name", sorted(set(BACKENDS) - {"torch"}))
def test_backend_equals_reference_over_an_engine_run(
    name: str, num_kv_heads: int, gqa: int, head_dim: int, block_size: int
) -> None:
    """Chunked prompts beside decodes of up to 20 sequences, step after step, in lockstep
    with the torch backend on the same inputs: equal outputs every step, equal caches."""
    torch.manual_seed(1)
    num_heads, scale = num_kv_heads * gqa, head_dim**-0.5
    prompts = [int(n) for n in torch.randint(1, 90, (20,))]
    outputs = [int(n) for n in torch.randint(1, 12, (20,))]
    lengths = [p + o for p, o in zip(prompts, outputs, strict=True)]
    num_blocks = sum(-(-n // block_size) for n in lengths) + 2
    tables = scattered_block_tables(lengths, block_size, num_blocks)
    pools = [KVPool(1, num_kv_heads, head_dim, num_blocks, block_size, torch.float32, CPU)]
    pools.append(KVPool(1, num_kv_heads, head_dim, num_blocks, block_size, torch.float32, CPU))
    backends = [TorchBackend(pools[0]), attention_backend(name)(pools[1])]
    layer = PagedAttention(num_heads, num_kv_heads, head_dim, scale, layer_idx=0)
    qkv = [
        tuple(torch.randn(n, h, head_dim) for h in (num_heads, num_kv_heads, num_kv_heads))
        for n in lengths
    ]
    steps = engine_steps(prompts, outputs, budget=64)
    assert any(n > 1 and start > 0 for step in steps for _, start, n in step), "no chunks"
    assert any(len({n == 1 for _, _, n in step}) == 2 for step in steps), "nothing mixed"
    for number, step in enumerate(steps):
        spans = [(start, n) for _, start, n in step]
        step_tables = [tables[i] for i, _, _ in step]
        step_qkv = [qkv[i] for i, _, _ in step]
        expected, got = (run_step(b, layer, spans, step_tables, step_qkv) for b in backends)
        for (i, start, n), e, g in zip(step, expected, got, strict=True):
            torch.testing.assert_close(
                g, e, msg=lambda m, s=(number, i, start, n): f"step, seq, start, n {s}: {m}"
            )
    torch.testing.assert_close(pools[1].cache, pools[0].cache, rtol=0, atol=0)


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


def test_registry_names_every_backend_and_refuses_unknown_names() -> None:
    assert attention_backend("torch") is TorchBackend
    assert attention_backend("sdpa") is SdpaBackend
    with pytest.raises(
        ValueError, match=r"unknown attention backend 'flash'; available: sdpa, torch"
    ):
        attention_backend("flash")
    assert attention_backend(Config().attention_backend) is SdpaBackend, "the default"
