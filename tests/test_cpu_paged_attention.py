"""The CPU paged-decode kernel (workers/attention/cpu_paged.py) against the torch reference
backend, and the seams around it: built once, refused cleanly, skipped where it does not fit.

Caches are random and block tables scattered over the pool. The reference runs on a float32
copy of the same pool (the kernel accumulates in float32 whatever the cache holds), so a
bfloat16 or float16 case differs from it only by the output's rounding.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from vlmserve.workers.attention import cpu_paged
from vlmserve.workers.attention.context import step_context
from vlmserve.workers.attention.metadata import build_metadata, spans_of
from vlmserve.workers.attention.sdpa_backend import SdpaBackend, SdpaGatherBackend
from vlmserve.workers.attention.torch_backend import TorchBackend
from vlmserve.workers.kv_pool import KVPool
from vlmserve.workers.layers.attention import PagedAttention

CPU = torch.device("cpu")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Context lengths after the step: 1, around block boundaries of 16, and long ones.
LENGTHS = [1, 2, 15, 16, 17, 31, 32, 33, 100, 257, 600]


def decode_step(
    backend_cls: type,
    pool: KVPool,
    layer: PagedAttention,
    lengths: list[int],
    tables: list[list[int]],
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, object]:
    """One step of decodes (the last token of each length) through a backend of `pool`."""
    backend = backend_cls(pool)
    meta = build_metadata(
        [n - 1 for n in lengths], [1] * len(lengths), tables, pool.block_size, CPU
    )
    with step_context(meta, backend):
        out = layer(q, *kv)
    return out, backend


def random_case(
    lengths: list[int], kv_heads: int, ratio: int, dim: int, block_size: int, seed: int
) -> tuple[torch.Tensor, list[list[int]], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A float32 cache ([2, kv_heads, slots, dim], random) with scattered tables, and each
    sequence's new q, k, v."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + 5
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(n)] for n in need]
    cache = torch.randn(1, 2, kv_heads, num_blocks * block_size, dim, generator=gen)
    q = torch.randn(len(lengths), kv_heads * ratio, dim, generator=gen)
    k = torch.randn(len(lengths), kv_heads, dim, generator=gen)
    v = torch.randn(len(lengths), kv_heads, dim, generator=gen)
    return cache, tables, q, (k, v)


def pool_of(cache: torch.Tensor, block_size: int, dtype: torch.dtype) -> KVPool:
    _, _, kv_heads, slots, dim = cache.shape
    pool = KVPool(1, kv_heads, dim, slots // block_size, block_size, dtype, CPU)
    pool.cache.copy_(cache)
    return pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 1, 5, 16, 40])
@pytest.mark.parametrize("ratio", [1, 4, 7])
@pytest.mark.parametrize(("dim", "block_size"), [(64, 16), (128, 16), (80, 1), (72, 16), (64, 7)])
def test_kernel_equals_reference(
    dim: int, block_size: int, ratio: int, window: int | None, dtype: torch.dtype
) -> None:
    assert cpu_paged.kernel() is not None, "the kernel did not build: see the warning logged"
    kv_heads = 2
    cache, tables, q, kv = random_case(LENGTHS, kv_heads, ratio, dim, block_size, seed=dim + ratio)
    layer = PagedAttention(kv_heads * ratio, kv_heads, dim, dim**-0.5, 0, window)
    # The same values in `dtype`, so the reference sees exactly what the kernel reads.
    cache, q, kv = cache.to(dtype), q.to(dtype), (kv[0].to(dtype), kv[1].to(dtype))
    pool = pool_of(cache.float(), block_size, dtype)
    out, backend = decode_step(SdpaBackend, pool, layer, LENGTHS, tables, q, kv)
    assert backend._step.paged is not None, "the decodes took the gather path"
    ref, _ = decode_step(
        TorchBackend,
        pool_of(cache.float(), block_size, torch.float32),
        layer,
        LENGTHS,
        tables,
        q.float(),
        (kv[0].float(), kv[1].float()),
    )
    assert out.dtype == dtype
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(
            out[i].float(),
            ref[i],
            atol=TOLERANCE[dtype],
            rtol=TOLERANCE[dtype],
            msg=lambda m, i=i, n=n: (
                f"sequence {i} (context {n}, window {window}, GQA {ratio}, "
                f"head_dim {dim}, block {block_size}, {dtype}): {m}"
            ),
        )


def test_kernel_reads_strided_queries_and_many_threads() -> None:
    """q as the model hands it (a view into the fused QKV output, rows not contiguous) and
    more OpenMP threads than items: same answer as the gather path."""
    lengths, kv_heads, ratio, dim, block_size = [3, 40, 77], 2, 4, 64, 16
    cache, tables, q, kv = random_case(lengths, kv_heads, ratio, dim, block_size, seed=7)
    fused = torch.cat([q.flatten(1), torch.zeros(len(lengths), 3 * dim)], dim=1)
    strided = fused[:, : q[0].numel()].view(q.shape)
    assert not strided.is_contiguous()
    layer = PagedAttention(kv_heads * ratio, kv_heads, dim, dim**-0.5, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        out, backend = decode_step(
            SdpaBackend, pool_of(cache, block_size, torch.float32), layer, lengths, tables,
            strided, kv,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert backend._step.paged is not None
    ref, _ = decode_step(
        SdpaGatherBackend, pool_of(cache, block_size, torch.float32), layer, lengths, tables,
        q, kv,
    )  # fmt: skip
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_a_mixed_step_runs_decodes_in_the_kernel_and_prefills_as_before() -> None:
    """Decodes then prefills (one fresh, one chunk after cached tokens) in one step."""
    kv_heads, ratio, dim, block_size = 2, 4, 64, 16
    spans = [(40, 1), (0, 1), (16, 1), (0, 20), (33, 9)]  # (cached, computed)
    lengths = [c + n for c, n in spans]
    cache, tables, _, _ = random_case(lengths, kv_heads, ratio, dim, block_size, seed=3)
    gen = torch.Generator().manual_seed(4)
    tokens = sum(n for _, n in spans)
    q = torch.randn(tokens, kv_heads * ratio, dim, generator=gen)
    k, v = (torch.randn(tokens, kv_heads, dim, generator=gen) for _ in range(2))
    layer = PagedAttention(kv_heads * ratio, kv_heads, dim, dim**-0.5, 0, 24)
    outs = {}
    for cls in (TorchBackend, SdpaBackend):
        backend = cls(pool_of(cache, block_size, torch.float32))
        meta = build_metadata([c for c, _ in spans], [n for _, n in spans], tables, 16, CPU)
        with step_context(meta, backend):
            outs[cls.name] = layer(q, k, v)
    assert backend._step.paged is not None and backend._step.paged.count == 3
    torch.testing.assert_close(outs["sdpa"], outs["torch"], atol=2e-5, rtol=2e-5)


def test_plan_keeps_the_gather_path_for_a_span_past_the_query() -> None:
    tables = [[0, 1], [2, 3]]
    meta = build_metadata([9, 20], [1, 1], tables, 16, CPU)
    assert cpu_paged.plan_step(meta)[0].count == 2
    behind = meta.__class__(**{**meta.__dict__, "bidirectional": spans_of([[(2, 8)], []], 2)})
    assert cpu_paged.plan_step(behind)[0] is not None  # an image in the past: causal reaches it
    ahead = meta.__class__(**{**meta.__dict__, "bidirectional": spans_of([[], [(18, 25)]], 2)})
    assert cpu_paged.plan_step(ahead)[0] is None
    prefill_only = build_metadata([0], [5], [[0]], 16, CPU)
    assert cpu_paged.plan_step(prefill_only)[0] is None


def test_build_is_cached_and_a_missing_compiler_is_one_warning(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cold build into an empty extensions dir logs that it compiles (this is the cold
    compile time CI pays, about 2 s); the second finds it; without a compiler, None."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="vlmserve.cbuild"):
        path = cpu_paged._build()
        assert "compiling the CPU paged attention kernels" in caplog.text
        caplog.clear()
        assert cpu_paged._build() == path and caplog.text == ""
    assert os.path.dirname(os.path.dirname(path)) == str(tmp_path)
    assert [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".so")] == [
        "paged_decode.so"
    ]
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="vlmserve.cpu_paged"):
        assert cpu_paged._load() is None
    assert "could not be built" in caplog.text and "gather path" in caplog.text


def test_without_the_kernel_the_backend_gathers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_paged, "kernel", lambda: None)
    lengths, kv_heads, ratio, dim = [5, 18, 33], 2, 4, 64
    cache, tables, q, kv = random_case(lengths, kv_heads, ratio, dim, 16, seed=1)
    layer = PagedAttention(kv_heads * ratio, kv_heads, dim, dim**-0.5, 0)
    out, backend = decode_step(
        SdpaBackend, pool_of(cache, 16, torch.float32), layer, lengths, tables, q, kv
    )
    assert backend._step.paged is None
    ref, _ = decode_step(
        TorchBackend, pool_of(cache, 16, torch.float32), layer, lengths, tables, q, kv
    )
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


# One step of the prefill kernel's cases, as (tokens cached, tokens computed): two decodes
# first (the kernel's rows start past them), fresh prompts across block boundaries of 16
# and 32, a one-token prefill after the first prefill (not a decode), and chunks after 1,
# 16 and 100 cached tokens.
PREFILL_STEP = [
    (29, 1), (199, 1),
    (0, 2), (0, 1), (0, 15), (0, 16), (0, 17), (0, 100), (0, 360),
    (1, 40), (16, 17), (100, 33), (31, 2), (64, 1),
]  # fmt: skip


def prefill_step(
    backend_cls: type,
    cache: torch.Tensor,
    block_size: int,
    dtype: torch.dtype,
    layer: PagedAttention,
    spans: list[tuple[int, int]],
    tables: list[list[int]],
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bidirectional: list | None = None,
) -> tuple[torch.Tensor, object]:
    backend = backend_cls(pool_of(cache, block_size, dtype))
    meta = build_metadata(
        [c for c, _ in spans], [n for _, n in spans], tables, block_size, CPU, bidirectional
    )
    with step_context(meta, backend):
        out = layer(*qkv)
    return out, backend


def random_prefills(
    spans: list[tuple[int, int]], kv_heads: int, ratio: int, dim: int, block_size: int, seed: int
) -> tuple[torch.Tensor, list[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A random float32 cache with scattered tables for `spans`, and the step's q, k, v."""
    cache, tables, _, _ = random_case(
        [c + n for c, n in spans], kv_heads, ratio, dim, block_size, seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = sum(n for _, n in spans)
    q = torch.randn(tokens, kv_heads * ratio, dim, generator=gen)
    k, v = (torch.randn(tokens, kv_heads, dim, generator=gen) for _ in range(2))
    return cache, tables, (q, k, v)


def assert_rows_close(out, ref, spans, dtype, case: str) -> None:
    """Each sequence's rows, failing with the sequence, its span and the max error."""
    row = 0
    for i, (cached, n) in enumerate(spans):
        got, want = out[row : row + n].float(), ref[row : row + n].float()
        err = float((got - want).abs().max())
        torch.testing.assert_close(
            got,
            want,
            atol=TOLERANCE[dtype],
            rtol=TOLERANCE[dtype],
            msg=lambda m, i=i, cached=cached, n=n, err=err: (
                f"sequence {i} ({n} tokens after {cached} cached; {case}): max error {err:.3g}\n{m}"
            ),
        )
        row += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 7, 100, 1000])
@pytest.mark.parametrize("ratio", [1, 2, 4, 7])
@pytest.mark.parametrize(("dim", "block_size"), [(64, 16), (128, 32), (80, 1), (72, 16)])
def test_prefill_kernel_equals_reference(
    dim: int, block_size: int, ratio: int, window: int | None, dtype: torch.dtype
) -> None:
    """Fresh prompts and chunks after cached tokens, decodes before them in the same step,
    against the torch reference on a float32 copy of the same values (bfloat16 and float16
    differ from it by the output's rounding and the kernel's float32 sums: looser)."""
    assert cpu_paged.kernel() is not None, "the kernel did not build: see the warning logged"
    kv_heads = 2
    spans = PREFILL_STEP
    cache, tables, qkv = random_prefills(spans, kv_heads, ratio, dim, block_size, seed=dim + ratio)
    layer = PagedAttention(kv_heads * ratio, kv_heads, dim, dim**-0.5, 0, window)
    cache, qkv = cache.to(dtype), tuple(x.to(dtype) for x in qkv)
    out, backend = prefill_step(
        SdpaBackend, cache.float(), block_size, dtype, layer, spans, tables, qkv
    )
    paged = backend._step.paged_prefills
    assert paged is not None and paged.seqs.tolist() == list(range(2, len(spans)))
    assert backend._step.plan(window)[0] == [], "a prefill took the SDPA path"
    ref, _ = prefill_step(
        TorchBackend, cache.float(), block_size, torch.float32, layer, spans, tables,
        tuple(x.float() for x in qkv),
    )  # fmt: skip
    assert out.dtype == dtype
    case = f"window {window}, GQA {ratio}, head_dim {dim}, block {block_size}, {dtype}"
    assert_rows_close(out, ref, spans, dtype, case)


def test_prefill_kernel_reads_strided_queries_and_many_threads() -> None:
    """q as a view into the fused QKV output and more threads than work items."""
    spans, kv_heads, ratio, dim = [(0, 20), (16, 3)], 2, 4, 64
    cache, tables, (q, k, v) = random_prefills(spans, kv_heads, ratio, dim, 16, seed=11)
    fused = torch.cat([q.flatten(1), torch.zeros(q.shape[0], 3 * dim)], dim=1)
    strided = fused[:, : q[0].numel()].view(q.shape)
    layer = PagedAttention(kv_heads * ratio, kv_heads, dim, dim**-0.5, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        out, backend = prefill_step(
            SdpaBackend, cache, 16, torch.float32, layer, spans, tables, (strided, k, v)
        )
    finally:
        torch.set_num_threads(threads)
    assert backend._step.paged_prefills is not None
    ref, _ = prefill_step(TorchBackend, cache, 16, torch.float32, layer, spans, tables, (q, k, v))
    assert_rows_close(out, ref, spans, torch.float32, "strided q, 8 threads")


def test_a_prefill_with_a_bidirectional_span_keeps_sdpa() -> None:
    """Gemma 3's image spans: the prompt whose queries a span holds goes through SDPA with
    its mask, the others of the step through the kernel; all equal the reference. A span
    wholly in the cached past is plain causal for the chunk: the kernel takes it."""
    spans, kv_heads, ratio, dim = [(0, 30), (0, 50), (20, 10)], 2, 2, 64
    bidirectional = [[], [(5, 21)], [(3, 9)]]
    cache, tables, qkv = random_prefills(spans, kv_heads, ratio, dim, 16, seed=5)
    layer = PagedAttention(kv_heads * ratio, kv_heads, dim, dim**-0.5, 0, 16)
    out, backend = prefill_step(
        SdpaBackend, cache, 16, torch.float32, layer, spans, tables, qkv, bidirectional
    )
    assert backend._step.paged_prefills.seqs.tolist() == [0, 2]
    assert [p.start for p in backend._step.plan(16)[0]] == [30]
    ref, _ = prefill_step(
        TorchBackend, cache, 16, torch.float32, layer, spans, tables, qkv, bidirectional
    )
    assert_rows_close(out, ref, spans, torch.float32, "bidirectional span in sequence 1")


def test_sdpa_gather_runs_no_kernel() -> None:
    spans, kv_heads, ratio, dim = [(9, 1), (0, 20), (16, 5)], 2, 4, 64
    cache, tables, qkv = random_prefills(spans, kv_heads, ratio, dim, 16, seed=2)
    layer = PagedAttention(kv_heads * ratio, kv_heads, dim, dim**-0.5, 0)
    out, backend = prefill_step(
        SdpaGatherBackend, cache, 16, torch.float32, layer, spans, tables, qkv
    )
    assert backend._kernel is None
    assert backend._step.paged is None and backend._step.paged_prefills is None
    assert len(backend._step.plan(None)[0]) == 2
    ref, _ = prefill_step(TorchBackend, cache, 16, torch.float32, layer, spans, tables, qkv)
    assert_rows_close(out, ref, spans, torch.float32, "sdpa_gather")


def test_the_pool_asks_for_huge_pages() -> None:
    """A CPU pool's cache is zeros and, where the kernel's transparent huge pages are not
    off, lies (past its first and last partial 2 MiB) in huge pages: the mapping holding it
    counts them (/proc/self/smaps). 64 MiB: past glibc's largest mmap threshold (32 MiB), so
    a fresh mapping, as the worker's pool is, not reused heap that was touched before."""
    pool = KVPool(2, 2, 64, 2048, 16, torch.float32, CPU)  # 64 MiB
    assert not pool.cache.any()
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:  # a kernel built without THP: the zeroed pool above is all there is
        mode = "[never]"
    if "[never]" in mode:
        return
    begin = pool.cache.data_ptr()
    end = begin + pool.cache.numel() * pool.cache.element_size()
    huge_kb, inside = 0, False  # over the mappings the cache overlaps (the advice splits one)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, stop = (int(x, 16) for x in head.split("-"))
                inside = start < end and stop > begin
            elif inside and head == "AnonHugePages:":
                huge_kb += int(line.split()[1])
    assert huge_kb >= 7 * 2048, f"{huge_kb} kB of huge pages"


def test_the_portable_c_path_equals_reference(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source without GCC's vector extensions (what clang compiles), built here by gcc
    told it is clang and, as clang 16 does, refusing undeclared functions: decodes and
    prefills of one step still equal the reference."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    flags = ["-D__clang__", "-Werror=implicit-function-declaration"]
    monkeypatch.setattr(cpu_paged, "FLAGS", [*cpu_paged.FLAGS, *flags])
    portable = cpu_paged._load()
    assert portable is not None
    monkeypatch.setattr(cpu_paged, "kernel", lambda: portable)
    kv_heads, ratio = 2, 4
    for dim, window in [(64, None), (64, 7), (72, 100)]:
        cache, tables, qkv = random_prefills(PREFILL_STEP, kv_heads, ratio, dim, 16, seed=dim)
        layer = PagedAttention(kv_heads * ratio, kv_heads, dim, dim**-0.5, 0, window)
        args = (cache, 16, torch.float32, layer, PREFILL_STEP, tables, qkv)
        out, backend = prefill_step(SdpaBackend, *args)
        assert backend._kernel is portable and backend._step.paged is not None
        assert backend._step.paged_prefills is not None
        ref, _ = prefill_step(TorchBackend, *args)
        case = f"portable C, head_dim {dim}, window {window}"
        assert_rows_close(out, ref, PREFILL_STEP, torch.float32, case)
