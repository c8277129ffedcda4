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
    assert attention_backend("sdpa_gather").paged_decode is False
    with pytest.raises(
        ValueError, match=r"unknown attention backend 'flash'; available: sdpa, sdpa_gather, torch"
    ):
        attention_backend("flash")
    assert attention_backend(Config().attention_backend) is SdpaBackend, "the default"


# Sliding windows and bidirectional spans. Per sequence: (cached, computed, spans), the spans
# (start, end exclusive) never cut by the cached prefix, as the runner guarantees for images.
SPAN_SEQS = [
    (40, 1, [(10, 20)]),  # decodes: spans in their history only
    (17, 1, [(3, 9), (11, 16)]),
    (5, 1, []),
    (0, 23, [(3, 9)]),  # fresh prompts: one span, two spans, a span of one token
    (0, 30, [(0, 7), (12, 26)]),
    (0, 5, [(4, 5)]),
    (9, 6, [(2, 5), (10, 14)]),  # a span in the cached prefix, one in the chunk
    (32, 17, [(33, 38), (40, 49)]),  # two spans after a cached prefix, one at its end
    (4, 16, [(5, 12), (13, 19)]),
    (20, 12, []),  # no spans beside sequences that have them
]


def allowed_keys(ctx: int, q_len: int, window: int | None, spans: list) -> torch.Tensor:
    """[q_len, ctx] bool from first principles, for the last q_len positions of a context:
    not in the future or in the query's own span, and (in a sliding layer) fewer than
    `window` positions back, as transformers' masking_utils composes Gemma 3's masks."""
    group = torch.full((ctx,), -1)
    for number, (start, end) in enumerate(spans):
        group[start:end] = number
    query = torch.arange(ctx - q_len, ctx)[:, None]
    key = torch.arange(ctx)[None, :]
    same_span = (group[query] == group[key]) & (group[query] >= 0)
    near = torch.ones_like(same_span) if window is None else query - key < window
    return ((key <= query) | same_span) & near


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allowed: torch.Tensor
) -> torch.Tensor:
    """Dense softmax attention; q: [q_len, heads, dim], k, v: [ctx, kv_heads, dim]."""
    ratio = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(ratio, dim=1), v.repeat_interleave(ratio, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def run_layers(
    backend: AttentionBackend,
    layers: list[PagedAttention],
    seqs: list[tuple[int, int, list]],
    tables: list[list[int]],
    qkv: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
) -> list[list[torch.Tensor]]:
    """One step through every layer (qkv[layer][seq]); outputs per layer, per sequence."""
    metadata = build_metadata(
        [s for s, _, _ in seqs],
        [n for _, n, _ in seqs],
        tables,
        backend.pool.block_size,
        CPU,
        bidirectional=[spans for _, _, spans in seqs],
    )
    outs = []
    with step_context(metadata, backend):
        for layer, layer_qkv in zip(layers, qkv, strict=True):
            rows = [[t[s : s + n] for t in x] for x, (s, n, _) in zip(layer_qkv, seqs, strict=True)]
            q, k, v = (torch.cat(part) for part in zip(*rows, strict=True))
            outs.append(list(layer(q, k, v).split([n for _, n, _ in seqs])))
    return outs


def check_windows_and_spans(
    name: str,
    seqs: list[tuple[int, int, list]],
    windows: list[int | None],
    num_kv_heads: int,
    gqa: int,
    block_size: int,
    head_dim: int = 16,
) -> None:
    """Layers with the given windows, one step caching every prefix then the mixed step;
    every layer's output of every sequence equals dense attention under the rule."""
    torch.manual_seed(0)
    num_heads, scale = num_kv_heads * gqa, head_dim**-0.5
    lengths = [start + n for start, n, _ in seqs]
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    pool = KVPool(len(windows), num_kv_heads, head_dim, num_blocks, block_size, torch.float32, CPU)
    backend = attention_backend(name)(pool)
    layers = [
        PagedAttention(num_heads, num_kv_heads, head_dim, scale, i, sliding_window=window)
        for i, window in enumerate(windows)
    ]
    tables = scattered_block_tables(lengths, block_size, num_blocks)
    qkv = [
        [
            tuple(torch.randn(n, h, head_dim) for h in (num_heads, num_kv_heads, num_kv_heads))
            for n in lengths
        ]
        for _ in windows
    ]
    cached = [i for i, (start, _, _) in enumerate(seqs) if start > 0]
    cached.sort(key=lambda i: seqs[i][0] != 1)  # decodes first
    prefix = [(0, seqs[i][0], [s for s in seqs[i][2] if s[1] <= seqs[i][0]]) for i in cached]
    steps = [
        (prefix, cached, run_layers(backend, layers, prefix, [tables[i] for i in cached],
                                    [[x[i] for i in cached] for x in qkv])),
        (seqs, range(len(seqs)), run_layers(backend, layers, seqs, tables, qkv)),
    ]  # fmt: skip
    for step, (step_seqs, members, outs) in enumerate(steps):
        for layer, window, layer_out in zip(layers, windows, outs, strict=True):
            for i, (start, n, spans), out in zip(members, step_seqs, layer_out, strict=True):
                q, k, v = (t[: start + n] for t in qkv[layer.layer_idx][i])
                allowed = allowed_keys(start + n, n, window, spans)
                torch.testing.assert_close(
                    out,
                    masked_attention(q[start:], k, v, scale, allowed),
                    msg=lambda m, s=(step, window, start, n, spans): (
                        f"step, window, start, n, spans {s}: {m}"
                    ),
                )


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(("num_kv_heads", "gqa"), [(1, 1), (2, 4), (1, 3)])
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_sliding_windows_equal_dense_attention(
    name: str, num_kv_heads: int, gqa: int, block_size: int
) -> None:
    """Windows of 1 (itself only), shorter than a block, not a multiple of blocks, and longer
    than every context, side by side with full layers in the same steps, over the mixed
    batch of the test above (decodes in several groups, chunks after cached prefixes)."""
    seqs = [(start, n, []) for start, n in SEQS]
    windows = [1, 3, None, 17, 8, 1000]
    check_windows_and_spans(name, seqs, windows, num_kv_heads, gqa, block_size)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(("num_kv_heads", "gqa"), [(1, 1), (2, 4)])
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_bidirectional_spans_equal_dense_attention(
    name: str, num_kv_heads: int, gqa: int, block_size: int
) -> None:
    """One and two spans per sequence, after cached prefixes and in them, in full layers and
    under windows both longer and shorter than the spans."""
    windows = [None, 4, 11, 64]
    check_windows_and_spans(name, SPAN_SEQS, windows, num_kv_heads, gqa, block_size)


@pytest.mark.parametrize("block_size", [1, 16])
def test_windowed_prompts_in_small_tiles(monkeypatch: pytest.MonkeyPatch, block_size: int) -> None:
    """sdpa's windowed fresh prompts in tiles of 4 queries (or the window): many tiles per
    prompt, first tiles without a mask, spans reaching past a tile's last query."""
    monkeypatch.setattr(sdpa_backend, "TILE", 4)
    seqs = [(start, n, []) for start, n in SEQS]
    check_windows_and_spans("sdpa", seqs, [1, 3, 17, None], 2, 2, block_size)
    check_windows_and_spans("sdpa", SPAN_SEQS, [2, 4, 11], 2, 2, block_size)


def test_window_plans_skip_what_they_can() -> None:
    """The sdpa plans: a fresh prompt within the window and without spans keeps the unmasked
    causal kernel; a longer one or one with a span gets a mask; a chunk and decodes under a
    window read only the blocks that hold keys inside it."""
    tables = [list(range(i * 30, i * 30 + 30)) for i in range(4)]
    # A decode at position 99, a chunk of 10 after 70 cached, fresh prompts of 23 and 12.
    meta = build_metadata([99, 70, 0, 0], [1, 10, 23, 12], tables, 4, CPU)
    assert [p.mask is None for p in sdpa_backend.prefills(meta, None)] == [False, True, True]
    assert [p.mask is None for p in sdpa_backend.prefills(meta, 23)] == [False, True, True]
    assert [p.mask is None for p in sdpa_backend.prefills(meta, 16)] == [False, False, True]
    chunk = sdpa_backend.prefills(meta, 16)[0]
    # Its first query (70) sees keys from 55 on: blocks 13..19 of its table, 28 keys.
    assert chunk.blocks.tolist() == list(range(30 + 13, 30 + 20))
    assert chunk.mask.shape == (10, 28)
    (group,) = torch_backend.decode_groups(meta, window=16)
    # Context 100, window 16: keys 84..99, blocks 21..24 of the table (16 keys, none masked).
    assert group.blocks.tolist() == [21, 22, 23, 24]
    assert not group.padding.any()
    (group,) = torch_backend.decode_groups(meta, window=15)  # keys 85..99: one masked
    assert group.padding.sum() == 1 and group.padding[0, 0, 0]
    spans = build_metadata([0, 0], [23, 12], tables[:2], 4, CPU, bidirectional=[[], [(2, 5)]])
    assert [p.mask is None for p in sdpa_backend.prefills(spans, None)] == [True, False]
    # A fresh prompt of 600 under a window of 100: tiles of 256 queries, each over the keys
    # from its first query's window on; the first needs a mask (it is longer than the window).
    long = build_metadata([0], [600], [list(range(150))], 4, CPU)
    tiles = sdpa_backend.prefills(long, 100)
    assert [(t.start, t.length, t.keys) for t in tiles] == [
        (0, 256, slice(0, 256)),
        (256, 256, slice(157, 512)),
        (512, 88, slice(413, 600)),
    ]
    assert all(t.mask is not None and t.blocks is None for t in tiles)
    # Within a window of 300 the first tile is plain causal.
    assert [t.mask is None for t in sdpa_backend.prefills(long, 300)] == [True, False]


def test_metadata_bidirectional_spans() -> None:
    tables = [[0, 1], [2]]
    assert build_metadata([0, 0], [5, 3], tables, 4, CPU).bidirectional is None
    assert build_metadata([0, 0], [5, 3], tables, 4, CPU, [[], None]).bidirectional is None
    meta = build_metadata([0, 0], [5, 3], tables, 4, CPU, [[(1, 4)], None])
    assert meta.bidirectional == (((1, 4),), ())
    with pytest.raises(ValueError, match="0 <= start < end"):
        build_metadata([0, 0], [5, 3], tables, 4, CPU, [[(3, 3)], None])
    with pytest.raises(ValueError, match="1 entries for 2 sequences"):
        build_metadata([0, 0], [5, 3], tables, 4, CPU, [[(1, 4)]])
    with pytest.raises(ValueError, match="sliding_window must be at least 1"):
        PagedAttention(2, 1, 8, 1.0, 0, sliding_window=0)
