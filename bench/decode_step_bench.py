"""Whole decode steps of the q30m model in one process, attention backends alternating step by
step on the same inputs: what the CPU paged-decode kernel saves in a real forward pass.

    .venv/bin/python bench/decode_step_bench.py [--batches 1,8,32] [--context 424]
        [--backends sdpa_gather,sdpa] [--repeats 20] [--threads N] [--cpu-gemm aten]
        [--out FILE]

A step is what the worker runs for a decode batch: the model's forward (embedding, 12 layers
with the KV store and attention, final norm) inside the backend's step context, then the LM
head on every row. Contexts are drawn around `--context` (± 64, seeded) over block tables
scattered across a pool of random K/V; every backend sees the same metadata, ids and cache.
Backends alternate within each repeat, so a load change on this shared machine hits both
alike; the table shows the median (and the fastest) step and the tokens/s they make. A
benchmark, not a test: the outputs are checked equal only loosely (same greedy tokens).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from engine_bench import bench_checkpoint
from report import write_json

from vlmserve.shared.config import Config
from vlmserve.workers.attention.context import step_context
from vlmserve.workers.attention.metadata import build_metadata
from vlmserve.workers.attention.registry import attention_backend
from vlmserve.workers.grammar import logits_width
from vlmserve.workers.kv_pool import KVPool
from vlmserve.workers.loader import load_model

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 16


def decode_inputs(batch: int, context: int, num_blocks: int, vocab: int, seed: int) -> tuple:
    """Metadata of `batch` decodes over scattered blocks, their token ids and positions."""
    rng = random.Random(seed)
    lengths = [max(1, context + rng.randint(-64, 64)) for _ in range(batch)]
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // BLOCK))] for n in lengths]
    meta = build_metadata([n - 1 for n in lengths], [1] * batch, tables, BLOCK, torch.device("cpu"))
    ids = torch.tensor([rng.randrange(3, vocab) for _ in range(batch)])
    return meta, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: q30m)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=424, help="mean context (360 + 64)")
    parser.add_argument("--backends", default="sdpa_gather,sdpa")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cpu-gemm", default=Config().cpu_gemm)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=os.path.join(HERE, "results", "decode_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or bench_checkpoint()
    model = load_model(model_dir, torch.float32, torch.device("cpu"), args.cpu_gemm)
    batches = [int(b) for b in args.batches.split(",")]
    names = args.backends.split(",")
    num_blocks = max(batches) * -(-(args.context + 64) // BLOCK) + 8
    pool = KVPool.for_model(model, num_blocks, BLOCK, torch.float32, torch.device("cpu"))
    pool.cache.normal_(generator=torch.Generator().manual_seed(args.seed))
    backends = {name: attention_backend(name)(pool) for name in names}
    vocab = logits_width(model)
    rows = {}
    with torch.inference_mode():
        for batch in batches:
            meta, ids = decode_inputs(batch, args.context, num_blocks, vocab, args.seed + batch)
            times: dict[str, list[float]] = {name: [] for name in names}
            tokens: dict[str, torch.Tensor] = {}
            for repeat in range(args.repeats + 2):  # two warm-ups
                for name in names:
                    started = time.perf_counter()
                    with step_context(meta, backends[name]):
                        hidden = model(ids, meta.positions)
                    logits = model.compute_logits(hidden)
                    elapsed = time.perf_counter() - started
                    if repeat >= 2:
                        times[name].append(elapsed)
                    tokens[name] = logits.argmax(-1)
            for name in names[1:]:
                same = (tokens[name] == tokens[names[0]]).float().mean().item()
                if same < 0.9:
                    raise SystemExit(f"{name} disagrees with {names[0]} on {1 - same:.0%} of rows")
            rows[f"decode batch {batch}"] = {
                name: {
                    "median_ms": 1000 * statistics.median(t),
                    "fastest_ms": 1000 * min(t),
                    "tok_s": batch / statistics.median(t),
                }
                for name, t in times.items()
            }
            print(f"batch {batch}: " + ", ".join(
                f"{n} {v['median_ms']:.2f} ms ({v['fastest_ms']:.2f})"
                for n, v in rows[f"decode batch {batch}"].items()
            ), flush=True)  # fmt: skip
    header = " | ".join(f"{n} ms (fastest), tok/s" for n in names)
    print(f"\n| step | {header} | {names[0]} / {names[-1]} |")
    print("| --- |" + " ---: |" * (len(names) + 1))
    for case, r in rows.items():
        cells = " | ".join(
            f"{r[n]['median_ms']:.2f} ({r[n]['fastest_ms']:.2f}), {r[n]['tok_s']:.0f}"
            for n in names
        )
        ratio = r[names[0]]["median_ms"] / r[names[-1]]["median_ms"]
        print(f"| {case} | {cells} | {ratio:.2f}x |")
    load = os.getloadavg()
    print(
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {torch.get_num_threads()} threads"
    )
    write_json(
        {
            "model": model_dir,
            "context": args.context,
            "threads": torch.get_num_threads(),
            "cpu_gemm": args.cpu_gemm,
            "load_average": load,
            "results": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
