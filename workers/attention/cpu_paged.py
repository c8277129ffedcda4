"""Attention on CPU that reads the paged KV cache in place, through the block tables.

The gather path (sdpa_backend's decode groups) copies every decode's blocks into a fresh
padded tensor per layer per step and then reads the copy again: at batch 32 that copy was a
third of a decode step. A chunk after cached tokens gathered its whole context per layer
too, and torch's fused SDPA ran fresh prompts at ~67 GFLOP/s on 2 cores. Two kernels here
walk each sequence's block table and read the keys and values where they lie, once.

One small C source (no torch headers, so it compiles in about two seconds), built with the
system C compiler on first use into torch's extensions cache dir (TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions), one build per source, flags, compiler and CPU, and called through
ctypes with the tensors' data pointers (ctypes lets go of the GIL for the call). The libgomp
it links is the one torch already loaded, so it shares torch's threads. Caches of float32,
bfloat16 and float16 (converted to float32 a block at a time); softmax in float32.

Decode: OpenMP over (sequence, KV head). Each item holds its GQA group's queries together,
so a key row read from memory serves all of them, scores a run of keys (at most one block)
at a time with an online softmax (on 16 lanes; P.V with up to 4 queries' accumulators in
registers, each row of V loaded once for them), and covers only keys [len - window, len)
under a sliding window: lengths, not masks, so no padding is read or computed.

Prefill (fresh prompts and chunks after cached tokens alike, their new keys already stored):
flash-style over work items (sequence, KV head, tile of query positions), the costliest
first under OpenMP's dynamic schedule. A tile's rows are its positions times the GQA group's
heads; keys come 16 positions at a time, K transposed so that scores are rank-1 updates and
P.V broadcast FMAs, 8 rows' accumulators in registers; chunks past a row group's last query
are skipped and the diagonal ones masked by position (and window).

When the compiler is missing or the build fails, one warning is logged and `kernel()`
returns None: the caller keeps the torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlmserve.workers.cbuild import build_library, load_library

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

#if FOLDED
static inline v16 vsel(i16 m, v16 a, v16 b) { return (v16)((m & (i16)a) | (~m & (i16)b)); }

static inline float hmax16(v16 a) {
    const i16 h8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    const i16 h4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const i16 h2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const i16 h1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    v16 b = __builtin_shuffle(a, h8);
    a = vsel(a > b, a, b);
    b = __builtin_shuffle(a, h4);
    a = vsel(a > b, a, b);
    b = __builtin_shuffle(a, h2);
    a = vsel(a > b, a, b);
    b = __builtin_shuffle(a, h1);
    a = vsel(a > b, a, b);
    return a[0];
}

static inline float hsum16(v16 a) {
    const i16 h8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    const i16 h4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const i16 h2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const i16 h1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    a += __builtin_shuffle(a, h8);
    a += __builtin_shuffle(a, h4);
    a += __builtin_shuffle(a, h2);
    a += __builtin_shuffle(a, h1);
    return a[0];
}

/* exp_neg on 16 lanes: the same polynomial, n rounded to nearest by the 1.5 * 2^23 trick
   (floorf(y + 0.5) in exp_neg; the two differ only at ties, either keeps |r| <= ln2 / 2). */
static inline v16 exp16(v16 x) {
    const v16 zero = {0};
    x = vsel(x < zero - 87.f, zero - 87.f, x);
    v16 t = x * 1.44269504088896341f + 12582912.f;
    v16 n = t - 12582912.f;
    v16 r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    v16 p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    i16 bits = ((i16)t - 0x4B400000 + 127) << 23;
    return p * (v16)bits;
}
#endif

#if FOLDED
/* acc[r] += sum_t p[r * CHUNK + t] * v_t for `rows` (<= 4, a constant where inlined) queries,
   dim a multiple of 16: the accumulators stay in registers over the run's keys, 32 of dim
   at a time, each row of V loaded once for all of them. */
static inline __attribute__((always_inline)) void pv_rows(
    float *acc, const float *p, const float *vr, int64_t n, int64_t dim, int rows) {
    int64_t c = 0;
    for (; c + 32 <= dim; c += 32) {
        v16 a0[4], a1[4];
        for (int r = 0; r < rows; r++) {
            a0[r] = load16(acc + r * dim + c);
            a1[r] = load16(acc + r * dim + c + 16);
        }
        for (int64_t t = 0; t < n; t++) {
            v16 v0 = load16(vr + t * dim + c), v1 = load16(vr + t * dim + c + 16);
            for (int r = 0; r < rows; r++) {
                a0[r] += p[r * CHUNK + t] * v0;
                a1[r] += p[r * CHUNK + t] * v1;
            }
        }
        for (int r = 0; r < rows; r++) {
            memcpy(acc + r * dim + c, &a0[r], sizeof(v16));
            memcpy(acc + r * dim + c + 16, &a1[r], sizeof(v16));
        }
    }
    if (c < dim) {
        v16 a0[4];
        for (int r = 0; r < rows; r++) a0[r] = load16(acc + r * dim + c);
        for (int64_t t = 0; t < n; t++) {
            v16 v0 = load16(vr + t * dim + c);
            for (int r = 0; r < rows; r++) a0[r] += p[r * CHUNK + t] * v0;
        }
        for (int r = 0; r < rows; r++) memcpy(acc + r * dim + c, &a0[r], sizeof(v16));
    }
}
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
#if FOLDED /* scores16 exists only then: a plain `if` would call an undeclared function */
        if (dim % 16 == 0) {
            for (int64_t t = 0; t < n; t += 16)
                scores16(qf, kr + t * dim, n - t < 16 ? n - t : 16, group, dim, sc + t,
                         ahead ? ahead + t * dim * esize : 0, esize);
        } else
#endif
        {
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
#if FOLDED
        if (dim % 16 == 0) {
            const i16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
            const v16 zero = {0};
            for (int64_t g = 0; g < group; g++) {
                float *sg = sc + g * CHUNK;
                v16 top = zero - INFINITY;
                for (int64_t t = 0; t < n; t += 16) { /* lanes past n: never read as keys */
                    v16 x = vsel(iota < (int)(n - t), load16(sg + t), zero - INFINITY);
                    top = vsel(top > x, top, x);
                }
                float mx = hmax16(top);
                if (mx > m[g]) { /* rescale what came before to the new maximum */
                    float corr = expf(m[g] - mx), *ag = acc + g * dim;
                    l[g] *= corr;
                    for (int64_t d = 0; d < dim; d += 16) {
                        v16 a = load16(ag + d) * corr;
                        memcpy(ag + d, &a, sizeof a);
                    }
                    m[g] = mx;
                }
                v16 sum = zero;
                for (int64_t t = 0; t < n; t += 16) {
                    v16 e = vsel(iota < (int)(n - t), exp16(load16(sg + t) - m[g]), zero);
                    memcpy(sg + t, &e, sizeof e);
                    sum += e;
                }
                l[g] += hsum16(sum);
            }
            for (int64_t t = 0; v_ahead && t < n; t++) /* the next run's values */
                prefetch_row(v_ahead + t * dim * esize, dim * esize);
            int64_t g = 0;
            for (; g + 4 <= group; g += 4) pv_rows(acc + g * dim, sc + g * CHUNK, vr, n, dim, 4);
            if (g + 2 <= group) {
                pv_rows(acc + g * dim, sc + g * CHUNK, vr, n, dim, 2);
                g += 2;
            }
            if (g < group) pv_rows(acc + g * dim, sc + g * CHUNK, vr, n, dim, 1);
            pos += n;
            continue;
        }
#endif
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

/* ---- prefill ----------------------------------------------------------------------------
   A work item is one KV head of one tile of a prefill's queries: the GQA group's heads at
   `nq` consecutive positions, held together as rows r = t * group + g, so that a key read
   serves every one of them. Keys come 16 positions at a time (across blocks, whatever the
   block size), K transposed into kt[dim][16] so that scores are rank-1 updates (a row's 16
   scores in one vector, RB rows at once), then an online softmax per row, then P.V as
   broadcast FMAs over rows of V, RB rows' accumulators in registers. */
#define RB 8 /* query rows scored and accumulated at once */

typedef struct {
    int32_t seq, pos0, nq, row0;
    int64_t cost;
} tile_t;

static int by_cost(const void *a, const void *b) {
    int64_t x = ((const tile_t *)a)->cost, y = ((const tile_t *)b)->cost;
    return x < y ? 1 : x > y ? -1 : 0;
}


/* Rows [0, RB) of qf (a row group, rows rg on) against the 16 keys of kt, from position p0
   (n of them real): the online softmax's step. Leaves the rows' weights in p[r * 16 + j]
   (0 where a row does not see key j), the factor their accumulators need in corr[r], and
   updates m and l. */
static inline __attribute__((always_inline)) void tile_softmax(
    const float *qf, const float *kt, int64_t dim, float *p, float *corr, float *m, float *l,
    int64_t rg, int64_t rows, int64_t group, int64_t pos0, int64_t p0, int64_t window,
    int masked) {
#if FOLDED
    v16 s[RB];
    for (int r = 0; r < RB; r++) s[r] = (v16){0};
    for (int64_t d = 0; d < dim; d++) {
        v16 k = load16(kt + d * 16);
        for (int r = 0; r < RB; r++) s[r] += qf[r * dim + d] * k;
    }
    const i16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const v16 zero = {0};
    for (int r = 0; r < RB; r++) {
        int64_t row = rg + r < rows ? rg + r : rows - 1;
        int64_t qp = pos0 + row / group, lo = window > 0 ? qp - window + 1 : 0;
        i16 ok = (i16){0} - 1; /* all lanes */
        if (masked) {
            ok = (iota <= (int)(qp - p0)) & (iota >= (int)(lo - p0));
            s[r] = vsel(ok, s[r], zero - INFINITY);
        }
        float mx = hmax16(s[r]), mr = m[rg + r];
        if (mx == -INFINITY) { /* nothing this row sees here */
            corr[r] = 1.f;
            memcpy(p + r * 16, &zero, sizeof zero);
            continue;
        }
        corr[r] = 1.f;
        if (mx > mr) {
            corr[r] = expf(mr - mx); /* 0 for the first keys (mr = -inf) */
            m[rg + r] = mr = mx;
        }
        v16 e = exp16(s[r] - mr);
        if (masked) e = vsel(ok, e, zero);
        l[rg + r] = l[rg + r] * corr[r] + hsum16(e);
        memcpy(p + r * 16, &e, sizeof e);
    }
#else
    for (int r = 0; r < RB; r++) {
        float s[16] = {0}, mx = -INFINITY, sum = 0.f;
        for (int64_t d = 0; d < dim; d++) {
            float x = qf[r * dim + d];
            for (int j = 0; j < 16; j++) s[j] += x * kt[d * 16 + j];
        }
        int64_t row = rg + r < rows ? rg + r : rows - 1;
        int64_t qp = pos0 + row / group, lo = window > 0 ? qp - window + 1 : 0;
        for (int j = 0; j < 16; j++) {
            if (masked && (p0 + j > qp || p0 + j < lo)) s[j] = -INFINITY;
            mx = fmaxf(mx, s[j]);
        }
        float mr = m[rg + r];
        corr[r] = 1.f;
        if (mx == -INFINITY) {
            memset(p + r * 16, 0, sizeof s);
            continue;
        }
        if (mx > mr) {
            corr[r] = expf(mr - mx);
            m[rg + r] = mr = mx;
        }
        for (int j = 0; j < 16; j++) {
            p[r * 16 + j] = s[j] == -INFINITY ? 0.f : exp_neg(s[j] - mr);
            sum += p[r * 16 + j];
        }
        l[rg + r] = l[rg + r] * corr[r] + sum;
    }
#endif
}

/* acc[r] = acc[r] * corr[r] + sum_j p[r * 16 + j] * vrow[j], rows [0, RB), keys j < n */
static inline __attribute__((always_inline)) void tile_pv(
    float *acc, const float *corr, const float *p, const float *const *vrow, int64_t n,
    int64_t dim) {
#if FOLDED
    if (dim % 16 == 0) {
        int64_t c = 0;
        for (; c + 32 <= dim; c += 32) {
            v16 a0[RB], a1[RB];
            for (int r = 0; r < RB; r++) {
                a0[r] = load16(acc + r * dim + c) * corr[r];
                a1[r] = load16(acc + r * dim + c + 16) * corr[r];
            }
            for (int64_t j = 0; j < n; j++) {
                v16 v0 = load16(vrow[j] + c), v1 = load16(vrow[j] + c + 16);
                for (int r = 0; r < RB; r++) {
                    a0[r] += p[r * 16 + j] * v0;
                    a1[r] += p[r * 16 + j] * v1;
                }
            }
            for (int r = 0; r < RB; r++) {
                memcpy(acc + r * dim + c, &a0[r], sizeof(v16));
                memcpy(acc + r * dim + c + 16, &a1[r], sizeof(v16));
            }
        }
        if (c < dim) { /* a last 16 (dim an odd multiple of 16) */
            v16 a0[RB];
            for (int r = 0; r < RB; r++) a0[r] = load16(acc + r * dim + c) * corr[r];
            for (int64_t j = 0; j < n; j++) {
                v16 v0 = load16(vrow[j] + c);
                for (int r = 0; r < RB; r++) a0[r] += p[r * 16 + j] * v0;
            }
            for (int r = 0; r < RB; r++) memcpy(acc + r * dim + c, &a0[r], sizeof(v16));
        }
        return;
    }
#endif
    for (int r = 0; r < RB; r++) {
        float *ar = acc + r * dim, cr = corr[r];
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) ar[d] *= cr;
        for (int64_t j = 0; j < n; j++) {
            float pj = p[r * 16 + j];
            const float *vj = vrow[j];
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) ar[d] += pj * vj[d];
        }
    }
}

/* One tile: queries at positions [pos0, pos0 + nq) (batch rows row0 on), KV head h, over
   keys [max(0, pos - window + 1), pos] each (window 0: from 0). */
static inline __attribute__((always_inline)) void prefill_tile(
    const void *q, int64_t q_row, int64_t q_head, void *out, int64_t out_row,
    int64_t out_head, int io_dt, const void *k_cache, const void *v_cache,
    int64_t head_stride, int dt, const int32_t *table, int64_t row0, int64_t pos0,
    int64_t nq, int64_t window, int64_t h, int64_t group, int64_t dim, int64_t bs,
    float scale, float *buf, int64_t rows_max) {
    int64_t rows = nq * group, padded = (rows + RB - 1) / RB * RB;
    float *qf = buf, *acc = qf + rows_max * dim, *m = acc + rows_max * dim, *l = m + rows_max;
    float *kt = l + rows_max, *vc = kt + 16 * dim, *sc = vc + 16 * dim, *corr = sc + RB * 16;
    float *krow = corr + RB;
    const float *vrow[16];
    for (int64_t r = 0; r < padded; r++) {
        float *qr = qf + r * dim;
        if (r < rows) {
            int64_t at = (row0 + r / group) * q_row + (h * group + r % group) * q_head;
            for (int64_t d = 0; d < dim; d++) qr[d] = load1(q, at + d, io_dt) * scale;
        } else {
            memset(qr, 0, sizeof(float) * dim); /* padding: scores 0, never stored */
        }
        m[r] = -INFINITY;
        l[r] = 0.f;
    }
    memset(acc, 0, sizeof(float) * padded * dim);
    int64_t last = pos0 + nq - 1;
    int64_t first = window > 0 && pos0 - window + 1 > 0 ? pos0 - window + 1 : 0;
    for (int64_t p0 = first - first % 16; p0 <= last; p0 += 16) {
        int64_t n = last + 1 - p0 < 16 ? last + 1 - p0 : 16;
        for (int64_t j = 0; j < n; j++) {
            int64_t pos = p0 + j;
            int64_t at = h * head_stride + ((int64_t)table[pos / bs] * bs + pos % bs) * dim;
            const float *kr;
            if (dt == F32) {
                kr = (const float *)k_cache + at;
                vrow[j] = (const float *)v_cache + at;
            } else {
                to_float(k_cache, at, dim, dt, krow);
                to_float(v_cache, at, dim, dt, vc + j * dim);
                kr = krow;
                vrow[j] = vc + j * dim;
            }
            for (int64_t d = 0; d < dim; d++) kt[d * 16 + j] = kr[d];
        }
        for (int64_t j = n; j < 16; j++)
            for (int64_t d = 0; d < dim; d++) kt[d * 16 + j] = 0.f;
        for (int64_t rg = 0; rg < padded; rg += RB) {
            /* positions of the group's first and last rows (padding: the last query's) */
            int64_t qmin = pos0 + rg / group;
            int64_t qmax = pos0 + (rg + RB - 1 < rows ? rg + RB - 1 : rows - 1) / group;
            if (p0 > qmax || (window > 0 && p0 + 15 < qmin - window + 1)) continue;
            int masked = p0 + 15 > qmin || (window > 0 && p0 < qmax - window + 1);
            tile_softmax(qf + rg * dim, kt, dim, sc, corr, m, l, rg, rows, group, pos0, p0,
                         window, masked);
            tile_pv(acc + rg * dim, corr, sc, vrow, n, dim);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        int64_t at = (row0 + r / group) * out_row + (h * group + r % group) * out_head;
        for (int64_t d = 0; d < dim; d++) store1(out, at + d, io_dt, acc[r * dim + d] * inv);
    }
}

#define TILE_ARGS                                                                           \
    const void *q, int64_t q_row, int64_t q_head, void *out, int64_t out_row,               \
        int64_t out_head, int io_dt, const void *k_cache, const void *v_cache,              \
        int64_t head_stride, int dt, const int32_t *table, int64_t row0, int64_t pos0,      \
        int64_t nq, int64_t window, int64_t h, int64_t group, int64_t dim, int64_t bs,      \
        float scale, float *buf, int64_t rows_max
#define TILE_PASS(DIM)                                                                      \
    q, q_row, q_head, out, out_row, out_head, io_dt, k_cache, v_cache, head_stride, dt,     \
        table, row0, pos0, nq, window, h, group, DIM, bs, scale, buf, rows_max
static void tile_64(TILE_ARGS) { prefill_tile(TILE_PASS(64)); }
static void tile_128(TILE_ARGS) { prefill_tile(TILE_PASS(128)); }
static void tile_any(TILE_ARGS) { prefill_tile(TILE_PASS(dim)); }

/* Sequences seqs[0..count) are prefills: sequence i computes the rows [qsl[i], qsl[i + 1])
   of q and out, the last of its seq_lens[i] positions, their keys and values already in
   the cache. Each query attends keys [max(0, pos - window + 1), pos] (window 0: from 0).
   Tiles of `tile` positions; work items (tile, KV head), the costliest first. */
void vlmserve_paged_prefill(
    const void *q, int64_t q_row, int64_t q_head, void *out, int64_t out_row,
    int64_t out_head, int io_dt, const void *k_cache, const void *v_cache,
    int64_t head_stride, int dt, const int32_t *block_tables, int64_t table_width,
    const int32_t *qsl, const int32_t *seq_lens, const int32_t *seqs, int64_t count,
    int64_t kv_heads, int64_t group, int64_t dim, int64_t bs, int64_t window, float scale,
    int threads, int64_t tile) {
    int64_t tiles = 0;
    for (int64_t i = 0; i < count; i++)
        tiles += (qsl[seqs[i] + 1] - qsl[seqs[i]] + tile - 1) / tile;
    tile_t *work = (tile_t *)malloc(sizeof(tile_t) * (size_t)(tiles > 0 ? tiles : 1));
    if (!work) return;
    int64_t w = 0;
    for (int64_t i = 0; i < count; i++) {
        int32_t s = seqs[i], start = qsl[s], n = qsl[s + 1] - start, cached = seq_lens[s] - n;
        for (int32_t t = 0; t < n; t += tile) {
            int32_t nq = n - t < tile ? n - t : (int32_t)tile, pos0 = cached + t;
            int64_t keys = pos0 + nq; /* the last query's; the window caps it */
            if (window > 0 && keys > window + nq - 1) keys = window + nq - 1;
            work[w++] = (tile_t){s, pos0, nq, start + t, keys * nq};
        }
    }
    qsort(work, (size_t)tiles, sizeof(tile_t), by_cost);
    int64_t rows_max = (tile * group + RB - 1) / RB * RB;
    size_t floats = (size_t)(2 * rows_max * dim + 2 * rows_max + 32 * dim + RB * 16 + RB + dim);
    void (*run)(TILE_ARGS) = dim == 64 ? tile_64 : dim == 128 ? tile_128 : tile_any;
#pragma omp parallel num_threads(threads)
    {
        float *buf = (float *)malloc(sizeof(float) * floats);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < tiles * kv_heads; item++) {
            const tile_t *t = work + item / kv_heads;
            if (buf)
                run(q, q_row, q_head, out, out_row, out_head, io_dt, k_cache, v_cache,
                    head_stride, dt, block_tables + t->seq * table_width, t->row0, t->pos0,
                    t->nq, window, item % kv_heads, group, dim, bs, scale, buf, rows_max);
        }
        free(buf);
    }
    free(work);
}
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]

_COMMON = (
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]  # q, its row and head strides
    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]  # out, strides, dtype
    + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]  # caches, stride, dtype
    + [ctypes.c_void_p, ctypes.c_int64]  # block tables, their width
)
_DECODE_ARGS = (
    _COMMON
    + [ctypes.c_void_p, ctypes.c_int64]  # lens, count
    + [ctypes.c_int64] * 5  # kv_heads, group, dim, block size, window
    + [ctypes.c_float, ctypes.c_int]  # scale, threads
)
_PREFILL_ARGS = (
    _COMMON
    + [ctypes.c_void_p] * 3  # query_start_loc, lens, the sequences
    + [ctypes.c_int64]  # how many sequences
    + [ctypes.c_int64] * 5  # kv_heads, group, dim, block size, window
    + [ctypes.c_float, ctypes.c_int, ctypes.c_int64]  # scale, threads, tile
)


@dataclass(frozen=True)
class Kernels:
    """The built library's two entry points (ctypes functions)."""

    decode: ctypes._CFuncPtr
    prefill: ctypes._CFuncPtr


@functools.cache
def kernel() -> Kernels | None:
    """The C functions, compiled on first use (once per machine); None when they cannot be."""
    return _load()


def _load() -> Kernels | None:
    lib = load_library(
        _build,
        "the CPU paged attention kernels",
        "attention keeps the slower torch paths (decodes: the gather path)",
        log,
    )
    if lib is None:
        return None
    kernels = Kernels(lib.vlmserve_paged_decode, lib.vlmserve_paged_prefill)
    for fn, args in ((kernels.decode, _DECODE_ARGS), (kernels.prefill, _PREFILL_ARGS)):
        fn.argtypes = args
        fn.restype = None
    return kernels


def _build() -> str:
    """The shared library's path, compiled into the extensions cache if not there yet."""
    return build_library("paged_decode", SOURCE, FLAGS, "the CPU paged attention kernels")


MADV_HUGEPAGE = 14  # linux/mman.h


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux for transparent huge pages under a fresh, untouched host tensor (the KV
    pool); True when it agreed. The kernels read a block (4 KiB per head at 16 x 64 float32)
    here and the next one elsewhere in a pool of hundreds of MB: with 4 KiB pages every block
    is a TLB miss, with 2 MiB pages one in 512. Where THP is `madvise` (this machine, many
    distributions) nothing is huge unless asked; pages touched before the call stay small."""
    if t.device.type != "cpu" or platform.system() != "Linux":
        return False
    huge = 1 << 21
    start = (t.data_ptr() + huge - 1) & ~(huge - 1)
    end = (t.data_ptr() + t.numel() * t.element_size()) & ~(huge - 1)
    if end <= start:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(start, end - start, MADV_HUGEPAGE) == 0


@dataclass(frozen=True)
class PagedDecodes:
    """A step's decodes (batch rows [0, count)) as the kernel reads them."""

    count: int
    block_tables: torch.Tensor  # [count, width] int32, contiguous
    seq_lens: torch.Tensor  # [count] int32, contiguous, on the host


def attend(
    kernels: Kernels,
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
    kernels.decode(
        *_tensors(q, out, k_cache, v_cache, decodes.block_tables),
        decodes.seq_lens.data_ptr(), decodes.count,
        kv_heads, q.shape[1] // kv_heads, dim, block_size, window or 0,
        scale, torch.get_num_threads(),
    )  # fmt: skip


def _tensors(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
) -> tuple:
    """The arguments both kernels start with (_COMMON), the layouts checked."""
    dim = k_cache.shape[-1]
    if q.stride(-1) != 1 or out.stride(-1) != 1 or k_cache.stride()[1:] != (dim, 1):
        raise ValueError("the paged attention kernels need rows of head_dim contiguous values")
    return (
        q.data_ptr(), q.stride(0), q.stride(1),
        out.data_ptr(), out.stride(0), out.stride(1), DTYPES[q.dtype],
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), DTYPES[k_cache.dtype],
        block_tables.data_ptr(), block_tables.shape[1],
    )  # fmt: skip


def plan_step(meta: AttentionMetadata) -> tuple[PagedDecodes | None, PagedPrefills | None]:
    """The step's decodes and prefills for the kernels (None where there are none), the
    int32 block tables and lengths both read made once; (None, None) off the CPU."""
    if meta.block_tables.device.type != "cpu":
        return None, None
    tables = meta.block_tables.to(torch.int32).contiguous()
    lengths = meta.seq_lens_cpu.to(torch.int32).contiguous()
    return plan(meta, tables, lengths), plan_prefills(meta, tables, lengths)


def plan(
    meta: AttentionMetadata, tables: torch.Tensor, lengths: torch.Tensor
) -> PagedDecodes | None:
    """The step's decodes (their rows of the int32 `tables` and `lengths`); None when there
    are none or one of them needs more than causal attention under a window: a bidirectional
    span holding its query and reaching past it. (The runner never ends a prefill chunk
    inside a span, so a one-token row has none; this keeps the gather path, which reads
    masks, should that change.)"""
    count = meta.num_decodes
    if count == 0:
        return None
    if meta.bidirectional is not None:
        for spans, length in zip(meta.bidirectional[:count], lengths[:count].tolist(), strict=True):
            if any(start < length and end > length for start, end in spans):
                return None
    return PagedDecodes(count, tables[:count], lengths[:count])  # leading rows: contiguous


# Query rows (positions x the GQA group's heads) per prefill work item. On q30m's shape (GQA
# 4) at load ~1: 384 rows (96 positions) against 192 took 360 tokens 0.566 vs 0.579 ms on 2
# threads, 5 x 360 2.91 vs 3.17, 2048 15.9 vs 16.0, a 360 chunk after 512 1.91 vs 2.07 (one
# thread: 1-8 % faster); 128 rows ran 5-30 % slower than 192 (a transposed key chunk serves
# fewer rows). GQA 1 and 8 measured best at 192 and 768 rows among 16-192 positions.
TILE_ROWS = 384


@dataclass(frozen=True)
class PagedPrefills:
    """A step's prefills (and chunks) that the kernel attends, as it reads them."""

    seqs: torch.Tensor  # [count] int32: their sequence indices
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, on the host
    seq_lens: torch.Tensor  # [num_seqs] int32, on the host
    block_tables: torch.Tensor  # [num_seqs, width] int32, contiguous

    @property
    def count(self) -> int:
        return self.seqs.shape[0]


def plan_prefills(
    meta: AttentionMetadata, tables: torch.Tensor, lengths: torch.Tensor
) -> PagedPrefills | None:
    """The step's prefills for the kernel: all but those with a bidirectional span holding
    one of their queries (they keep SDPA's masks). None when none is left."""
    if meta.num_seqs == meta.num_decodes:
        return None
    ends = lengths.tolist()
    starts = meta.query_start_loc_cpu.tolist()
    seqs = []
    for i in range(meta.num_decodes, meta.num_seqs):
        first = ends[i] - (starts[i + 1] - starts[i])
        if meta.bidirectional is None or not any(
            s < ends[i] and e > first for s, e in meta.bidirectional[i]
        ):
            seqs.append(i)
    if not seqs:
        return None
    return PagedPrefills(
        torch.tensor(seqs, dtype=torch.int32),
        meta.query_start_loc_cpu.to(torch.int32).contiguous(),
        lengths,
        tables,
    )


def attend_prefills(
    kernels: Kernels,
    prefills: PagedPrefills,
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_size: int,
    window: int | None,
    scale: float,
    tile: int | None = None,
) -> None:
    """Write the prefills' rows of `out` with causal attention (under `window`, if any) over
    their whole context in the cache, their new keys included (stored before this call).
    Layouts as for `attend`. `tile`: query positions per work item (default from TILE_ROWS)."""
    kv_heads, _, dim = k_cache.shape
    group = q.shape[1] // kv_heads
    kernels.prefill(
        *_tensors(q, out, k_cache, v_cache, prefills.block_tables),
        prefills.query_start_loc.data_ptr(), prefills.seq_lens.data_ptr(),
        prefills.seqs.data_ptr(), prefills.count,
        kv_heads, group, dim, block_size, window or 0,
        scale, torch.get_num_threads(), tile or max(16, TILE_ROWS // group),
    )  # fmt: skip
