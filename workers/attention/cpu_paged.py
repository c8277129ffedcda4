"""Decode attention on CPU that reads the paged KV cache in place, through the block tables.

The gather path (sdpa_backend's decode groups) copies every decode's blocks into a fresh
padded tensor per layer per step and then reads the copy again: at batch 32 that copy was a
third of a decode step. This kernel walks each sequence's block table and reads the keys
and values where they lie, once.

One small C function (no torch headers, so it compiles in about a second), built with the
system C compiler on first use into torch's extensions cache dir (TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions), one build per source, flags, compiler and CPU, and called through
ctypes with the tensors' data pointers (ctypes lets go of the GIL for the call). Work is
split with OpenMP over (sequence, KV head); the libgomp it links is the one torch already
loaded, so it shares torch's threads. Each item holds its GQA group's queries together, so a
key row read from memory serves all of them, scores a run of keys (at most one block) at a
time with an online softmax in float32, and covers only keys [len - window, len) under a
sliding window: lengths, not masks, so no padding is read or computed. Caches of float32,
bfloat16 and float16 (converted to float32 a block at a time).

When the compiler is missing or the build fails, one warning is logged and `kernel()`
returns None: the caller keeps the gather path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlmserve.workers.attention.metadata import AttentionMetadata

log = logging.getLogger("vlmserve.cpu_paged")

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define CHUNK 64 /* keys scored at once; a run never crosses a block */

static inline float load1(const void *p, int64_t i, int dt) {
    if (dt == BF16) {
        uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &b, 4);
        return f;
    }
    if (dt == F16) return (float)((const _Float16 *)p)[i];
    return ((const float *)p)[i];
}

static inline void store1(void *p, int64_t i, int dt, float x) {
    if (dt == BF16) { /* round to nearest even, as torch does */
        uint32_t b;
        memcpy(&b, &x, 4);
        b = isnan(x) ? 0x7fc00000u : b + 0x7fffu + ((b >> 16) & 1u);
        ((uint16_t *)p)[i] = (uint16_t)(b >> 16);
    } else if (dt == F16) {
        ((_Float16 *)p)[i] = (_Float16)x;
    } else {
        ((float *)p)[i] = x;
    }
}

/* e^x for x <= 0 in plain arithmetic, so that loops over it vectorize (glibc's expf is a
   call per value): Cephes' expf, x = n ln2 + r, a degree-6 polynomial in r, times 2^n;
   within 1.4 ulp of exp over [-87, 0], and about 1e-38 below (never -inf here). */
static inline float exp_neg(float x) {
    x = x < -87.f ? -87.f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* n values from p + at, as float32, into out */
static void to_float(const void *p, int64_t at, int64_t n, int dt, float *restrict out) {
    if (dt == BF16) {
        const uint16_t *s = (const uint16_t *)p + at;
        for (int64_t i = 0; i < n; i++) {
            uint32_t b = (uint32_t)s[i] << 16;
            memcpy(out + i, &b, 4);
        }
    } else {
        const _Float16 *s = (const _Float16 *)p + at;
        for (int64_t i = 0; i < n; i++) out[i] = (float)s[i];
    }
}

/* `bytes` from p into the cache, a 64-byte line at a time (a row the next run will read). */
static inline void prefetch_row(const char *p, int64_t bytes) {
    for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(p + c);
}

#if defined(__GNUC__) && !defined(__clang__)
#define FOLDED 1
typedef float v16 __attribute__((vector_size(64)));
typedef int i16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v16 fold(v16 a, v16 b, i16 lo, i16 hi) {
    return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

/* sc[g * CHUNK + t] = qf_g . k_t for the n <= 16 keys at kr (dim a multiple of 16). Each
   key's products are summed lane-wise into one vector, and the 16 vectors are folded into
   one of 16 dot products, halving at each of 4 levels (a transpose as it adds): 15 folds
   instead of 16 horizontal sums. `ahead`: the next run's keys, fetched meanwhile. */
static inline __attribute__((always_inline)) void scores16(
    const float *qf, const float *kr, int64_t n, int64_t group, int64_t dim, float *sc,
    const char *ahead, int64_t esize) {
    const i16 a1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const i16 b1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const i16 a2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const i16 b2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const i16 a3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const i16 b3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const i16 a4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const i16 b4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    for (int64_t g = 0; g < group; g++) {
        const float *qg = qf + g * dim;
        v16 p[16];
        for (int64_t t = 0; t < 16; t++) {
            v16 acc = {0};
            if (t < n)
                for (int64_t c = 0; c < dim; c += 16)
                    acc += load16(qg + c) * load16(kr + t * dim + c);
            if (g == 0 && ahead && t < n) /* the next run's row t, as in attend_one */
                prefetch_row(ahead + t * dim * esize, dim * esize);
            p[t] = acc;
        }
        for (int i = 0; i < 8; i++) p[i] = fold(p[2 * i], p[2 * i + 1], a1, b1);
        for (int i = 0; i < 4; i++) p[i] = fold(p[2 * i], p[2 * i + 1], a2, b2);
        for (int i = 0; i < 2; i++) p[i] = fold(p[2 * i], p[2 * i + 1], a3, b3);
        p[0] = fold(p[0], p[1], a4, b4);
        memcpy(sc + g * CHUNK, &p[0], sizeof(float) * (size_t)n);
    }
}
#else
#define FOLDED 0
#endif

/* One sequence, one KV head: its `group` queries over keys [first, len). Inlined into a
   copy per common head size, so that the loops over `dim` have a constant trip count. */
static inline __attribute__((always_inline)) void attend_one(
    const void *q, int64_t q_row, int64_t q_head, void *out, int64_t out_row,
    int64_t out_head, int io_dt, const void *k_cache, const void *v_cache,
    int64_t head_stride, int dt, const int32_t *table, int64_t len, int64_t first,
    int64_t s, int64_t h, int64_t group, int64_t dim, int64_t bs, float scale, float *buf) {
    float *qf = buf, *acc = qf + group * dim, *kf = acc + group * dim;
    float *vf = kf + CHUNK * dim, *sc = vf + CHUNK * dim, *m = sc + group * CHUNK;
    float *l = m + group;
    const int64_t esize = dt == F32 ? 4 : 2;
    for (int64_t g = 0; g < group; g++) {
        for (int64_t d = 0; d < dim; d++)
            qf[g * dim + d] = load1(q, s * q_row + (h * group + g) * q_head + d, io_dt) * scale;
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    memset(acc, 0, sizeof(float) * group * dim);
    for (int64_t pos = first; pos < len;) {
        int64_t off = pos % bs, n = bs - off;
        if (n > len - pos) n = len - pos;
        if (n > CHUNK) n = CHUNK;
        int64_t at = h * head_stride + ((int64_t)table[pos / bs] * bs + off) * dim;
        /* The next run starts a block elsewhere in the pool, where the hardware prefetcher
           has not been: fetch its row t while row t of this run is read. */
        int64_t next = pos + n < len ? h * head_stride + (int64_t)table[(pos + n) / bs] * bs * dim
                                     : -1;
        const float *kr, *vr;
        if (dt == F32) {
            kr = (const float *)k_cache + at;
            vr = (const float *)v_cache + at;
        } else {
            to_float(k_cache, at, n * dim, dt, kf);
            to_float(v_cache, at, n * dim, dt, vf);
            kr = kf;
            vr = vf;
        }
        const char *ahead = next >= 0 ? (const char *)k_cache + next * esize : 0;
        const char *v_ahead = next >= 0 ? (const char *)v_cache + next * esize : 0;
        if (FOLDED && dim % 16 == 0) {
            for (int64_t t = 0; t < n; t += 16)
                scores16(qf, kr + t * dim, n - t < 16 ? n - t : 16, group, dim, sc + t,
                         ahead ? ahead + t * dim * esize : 0, esize);
        } else {
            for (int64_t t = 0; t < n; t++) {
                const float *kt = kr + t * dim;
                if (ahead) prefetch_row(ahead + t * dim * esize, dim * esize);
                for (int64_t g = 0; g < group; g++) {
                    const float *qg = qf + g * dim;
                    float a = 0.f;
#pragma omp simd reduction(+ : a)
                    for (int64_t d = 0; d < dim; d++) a += qg[d] * kt[d];
                    sc[g * CHUNK + t] = a;
                }
            }
        }
        for (int64_t g = 0; g < group; g++) {
            float *sg = sc + g * CHUNK, mx = m[g], sum = 0.f;
            for (int64_t t = 0; t < n; t++) mx = fmaxf(mx, sg[t]);
            if (mx != m[g]) { /* rescale what came before to the new maximum */
                float corr = expf(m[g] - mx);
                l[g] *= corr;
                float *ag = acc + g * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; d++) ag[d] *= corr;
                m[g] = mx;
            }
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < n; t++) {
                sg[t] = exp_neg(sg[t] - mx);
                sum += sg[t];
            }
            l[g] += sum;
        }
        for (int64_t t = 0; t < n; t++) {
            const float *vt = vr + t * dim;
            if (v_ahead) prefetch_row(v_ahead + t * dim * esize, dim * esize);
            for (int64_t g = 0; g < group; g++) {
                float p = sc[g * CHUNK + t], *ag = acc + g * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; d++) ag[d] += p * vt[d];
            }
        }
        pos += n;
    }
    for (int64_t g = 0; g < group; g++) {
        float inv = l[g] > 0.f ? 1.f / l[g] : 0.f; /* no keys (len 0): zeros */
        for (int64_t d = 0; d < dim; d++)
            store1(out, s * out_row + (h * group + g) * out_head + d, io_dt,
                   acc[g * dim + d] * inv);
    }
}

#define ATTEND_ARGS                                                                         \
    const void *q, int64_t q_row, int64_t q_head, void *out, int64_t out_row,               \
        int64_t out_head, int io_dt, const void *k_cache, const void *v_cache,              \
        int64_t head_stride, int dt, const int32_t *table, int64_t len, int64_t first,      \
        int64_t s, int64_t h, int64_t group, int64_t dim, int64_t bs, float scale, float *buf
#define PASS_ARGS(DIM)                                                                      \
    q, q_row, q_head, out, out_row, out_head, io_dt, k_cache, v_cache, head_stride, dt,     \
        table, len, first, s, h, group, DIM, bs, scale, buf
static void attend_64(ATTEND_ARGS) { attend_one(PASS_ARGS(64)); }
static void attend_128(ATTEND_ARGS) { attend_one(PASS_ARGS(128)); }
static void attend_any(ATTEND_ARGS) { attend_one(PASS_ARGS(dim)); }

/* Rows 0..num_seqs-1 of q and out ([rows, kv_heads * group, dim], strides in elements, the
   last one 1) are the decodes; sequence s attends keys [max(0, len - window), len) of its
   block table (window 0: all), len = seq_lens[s]. Caches: [kv_heads, slots, dim] each,
   heads head_stride elements apart, slot = block * bs + offset. */
void vlmserve_paged_decode(
    const void *q, int64_t q_row, int64_t q_head, void *out, int64_t out_row,
    int64_t out_head, int io_dt, const void *k_cache, const void *v_cache,
    int64_t head_stride, int dt, const int32_t *block_tables, int64_t table_width,
    const int32_t *seq_lens, int64_t num_seqs, int64_t kv_heads, int64_t group,
    int64_t dim, int64_t bs, int64_t window, float scale, int threads) {
    int64_t items = num_seqs * kv_heads;
    size_t floats = (size_t)(2 * group * dim + 2 * CHUNK * dim + group * CHUNK + 2 * group);
    void (*attend)(ATTEND_ARGS) = dim == 64 ? attend_64 : dim == 128 ? attend_128 : attend_any;
#pragma omp parallel num_threads(threads)
    {
        float *buf = (float *)malloc(sizeof(float) * floats);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            int64_t s = item / kv_heads, h = item % kv_heads, len = seq_lens[s];
            int64_t first = window > 0 && len > window ? len - window : 0;
            if (buf)
                attend(q, q_row, q_head, out, out_row, out_head, io_dt, k_cache, v_cache,
                       head_stride, dt, block_tables + s * table_width, len, first, s, h, group,
                       dim, bs, scale, buf);
        }
        free(buf);
    }
}
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]

_ARGTYPES = (
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]  # q, its row and head strides
    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]  # out, strides, dtype
    + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]  # caches, stride, dtype
    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]  # tables, lens
    + [ctypes.c_int64] * 5  # kv_heads, group, dim, block size, window
    + [ctypes.c_float, ctypes.c_int]  # scale, threads
)

_lock = threading.Lock()
_built: list = []  # [the C function, or None when it could not be built]


def kernel():
    """The C function, compiled on first use (once per machine); None when it cannot be."""
    if not _built:
        with _lock:
            if not _built:
                _built.append(_load())
    return _built[0]


def _load():
    try:
        path = _build()
        fn = ctypes.CDLL(path).vlmserve_paged_decode
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        log.warning(
            "the CPU paged-decode attention kernel could not be built (%s); decodes keep the "
            "slower gather path",
            str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__,
        )
        return None
    fn.argtypes = _ARGTYPES
    fn.restype = None
    return fn


def _build() -> str:
    """The shared library's path, compiled into the extensions cache if not there yet."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    # -march=native: the build is only good for this CPU, so its features are in the key.
    key = hashlib.sha256(
        "\n".join([SOURCE, " ".join(FLAGS), version, platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    folder = os.path.join(root, f"vlmserve_paged_decode_{key}")
    path = os.path.join(folder, "paged_decode.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    log.info("compiling the CPU paged-decode attention kernel into %s (once per machine)", folder)
    source = os.path.join(folder, "paged_decode.c")
    with open(source + f".{os.getpid()}", "w") as f:
        f.write(SOURCE)
    os.replace(source + f".{os.getpid()}", source)
    # Built beside its final name and renamed: processes compiling at once never load a
    # half-written library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *FLAGS, source, "-o", partial, "-lm"], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip() or done.returncode}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


@dataclass(frozen=True)
class PagedDecodes:
    """A step's decodes (batch rows [0, count)) as the kernel reads them."""

    count: int
    block_tables: torch.Tensor  # [count, width] int32, contiguous
    seq_lens: torch.Tensor  # [count] int32, contiguous, on the host


def attend(
    fn,
    decodes: PagedDecodes,
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_size: int,
    window: int | None,
    scale: float,
) -> None:
    """Write rows [0, decodes.count) of `out` with the decodes' attention over the cache.

    q, out: [tokens, heads, dim] on the CPU, q's dtype, last dim contiguous; k_cache,
    v_cache: one layer's [kv_heads, slots, dim] (KVPool.kv), the rows of a head contiguous.
    """
    kv_heads, _, dim = k_cache.shape
    if q.stride(-1) != 1 or out.stride(-1) != 1 or k_cache.stride()[1:] != (dim, 1):
        raise ValueError("the paged decode kernel needs rows of head_dim contiguous values")
    fn(
        q.data_ptr(), q.stride(0), q.stride(1),
        out.data_ptr(), out.stride(0), out.stride(1), DTYPES[q.dtype],
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), DTYPES[k_cache.dtype],
        decodes.block_tables.data_ptr(), decodes.block_tables.shape[1],
        decodes.seq_lens.data_ptr(), decodes.count,
        kv_heads, q.shape[1] // kv_heads, dim, block_size, window or 0,
        scale, torch.get_num_threads(),
    )  # fmt: skip


def plan(meta: AttentionMetadata) -> PagedDecodes | None:
    """The step's decodes for the kernel; None when there are none or one of them needs
    more than causal attention under a window: a bidirectional span holding its query and
    reaching past it. (The runner never ends a prefill chunk inside a span, so a one-token
    row has none; this keeps the gather path, which reads masks, should that change.)"""
    count = meta.num_decodes
    if count == 0 or meta.block_tables.device.type != "cpu":
        return None
    if meta.bidirectional is not None:
        lengths = meta.seq_lens_cpu[:count].tolist()
        for spans, length in zip(meta.bidirectional[:count], lengths, strict=True):
            if any(start < length and end > length for start, end in spans):
                return None
    return PagedDecodes(
        count,
        meta.block_tables[:count].to(torch.int32).contiguous(),
        meta.seq_lens_cpu[:count].to(torch.int32).contiguous(),
    )
