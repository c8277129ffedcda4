"""Attention micro-benchmark: every backend on the q30m shape, one whole step of 12 layers.

    .venv/bin/python bench/attention_bench.py [--repeats 15] [--threads N] [--only TEXT]
        [--backends sdpa_gather,sdpa] [--out FILE]

Shape of the q30m checkpoint (Qwen2: 8 heads, 2 KV heads, head_dim 64, 12 layers), float32,
block size 16, block tables scattered over the pool. Cases: a fresh prefill of 360 tokens,
a 360-token chunk after 512 cached tokens, and decodes at batch 1, 8 and 32 over contexts of
450-550 tokens (seeded); then sliding windows: decodes at batch 32 over contexts of
1900-2100 tokens and a fresh prefill of 2048, each with every layer's window 512 and without;
last, five fresh 360-token prefills in one step (q30m's serving workload at concurrency 8)
(--only picks the cases whose name holds TEXT). A step is the backend's prepare() plus the
12 layers' forward (KV store and attention), the same inputs for every backend. Backends
run alternately, each case `--repeats` times after a warm-up; the table shows the median
(and the fastest run: the machine here is shared, and the fastest is the least disturbed).
--threads 1 gives steadier figures on a busy machine: torch's OpenMP threads wait for each
other at every kernel's end, so one descheduled thread stalls the op.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from report import write_json

from vlmserve.workers.attention.context import step_context
from vlmserve.workers.attention.metadata import build_metadata
from vlmserve.workers.attention.registry import BACKENDS
from vlmserve.workers.kv_pool import KVPool
from vlmserve.workers.layers.attention import PagedAttention

HERE = os.path.dirname(os.path.abspath(__file__))
HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 8, 2, 64, 12, 16


def cases(seed: int) -> dict[str, tuple[list[tuple[int, int]], int | None]]:
    """Each case's sequences as (tokens cached, tokens computed), decodes first, and the
    sliding window of every layer (None: whole context)."""
    rng = random.Random(seed)
    out = {"prefill 360": ([(0, 360)], None), "prefill 360 after 512 cached": ([(512, 360)], None)}
    for batch in (1, 8, 32):
        out[f"decode batch {batch}"] = (
            [(rng.randint(450, 550) - 1, 1) for _ in range(batch)],
            None,
        )
    long = [(rng.randint(1900, 2100) - 1, 1) for _ in range(32)]
    for window in (None, 512):
        name = "no window" if window is None else f"window {window}"
        out[f"decode batch 32, ~2k context, {name}"] = (long, window)
        out[f"prefill 2048, {name}"] = ([(0, 2048)], window)
    out["prefill 5 x 360"] = ([(0, 360)] * 5, None)  # last: the other cases' inputs as before
    return out


def step_inputs(seqs: list[tuple[int, int]], rng: random.Random) -> tuple:
    """Metadata over scattered blocks and random q, k, v for every layer's call."""
    need = [-(-(start + n) // BLOCK) for start, n in seqs]
    free = list(range(sum(need) + 1))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in need]
    meta = build_metadata(
        [s for s, _ in seqs], [n for _, n in seqs], tables, BLOCK, torch.device("cpu")
    )
    tokens = meta.num_tokens
    q = torch.randn(tokens, HEADS, HEAD_DIM)
    k, v = torch.randn(2, tokens, KV_HEADS, HEAD_DIM)
    return meta, sum(need) + 1, (q, k, v)


def time_step(backend, layers: list[PagedAttention], meta, qkv: tuple) -> float:
    started = time.perf_counter()
    with step_context(meta, backend):
        for layer in layers:
            layer(*qkv)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", default="", help="run only the cases whose name holds this")
    parser.add_argument(
        "--backends",
        default="",
        help="comma-separated, the baseline first (default: all, the torch reference first)",
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results", "attention.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    names = (
        args.backends.split(",") if args.backends else sorted(BACKENDS, key=lambda n: n != "torch")
    )
    results: dict[str, dict[str, float]] = {}
    fastest: dict[str, dict[str, float]] = {}
    for case, (seqs, window) in cases(args.seed).items():
        meta, num_blocks, qkv = step_inputs(seqs, rng)  # drawn for every case: same inputs
        if args.only not in case:
            continue
        layers = [
            PagedAttention(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5, i, sliding_window=window)
            for i in range(LAYERS)
        ]
        backends = {}  # the last case's pools go (batch 32 at ~2k tokens: 0.8 GB each)
        for name in names:
            pool = KVPool(LAYERS, KV_HEADS, HEAD_DIM, num_blocks, BLOCK, torch.float32, "cpu")
            pool.cache.normal_()  # the cached prefix: any values will do
            backends[name] = BACKENDS[name](pool)
            time_step(backends[name], layers, meta, qkv)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                times[name].append(time_step(backends[name], layers, meta, qkv))
        results[case] = {name: 1000 * statistics.median(t) for name, t in times.items()}
        fastest[case] = {name: 1000 * min(t) for name, t in times.items()}
        print(case, {n: f"{ms:.2f} ms" for n, ms in results[case].items()}, flush=True)
    print()
    print(
        "| step (12 layers) | "
        + " | ".join(f"{n} ms (fastest)" for n in names)
        + f" | {names[0]} / best |"
    )
    print("| --- | " + " | ".join("---:" for _ in names) + " | ---: |")
    for case, row in results.items():
        cells = " | ".join(f"{row[n]:.2f} ({fastest[case][n]:.2f})" for n in names)
        best = min(row[n] for n in names[1:]) if len(names) > 1 else row[names[0]]
        print(f"| {case} | {cells} | {row[names[0]] / best:.2f}x |")
    report = {
        "shape": {
            "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "layers": LAYERS,
            "block_size": BLOCK, "dtype": "float32", "threads": torch.get_num_threads(),
        },
        "repeats": args.repeats,
        "median_ms_per_step": results,
        "fastest_ms_per_step": fastest,
        "load_average": os.getloadavg(),
    }  # fmt: skip
    write_json(report, args.out)


if __name__ == "__main__":
    main()
