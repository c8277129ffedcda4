"""Offline engine benchmark: vlmserve's engine against transformers `generate`, side by side.

    .venv/bin/python bench/engine_bench.py [--requests 128] [--batch 64] [--cpu-gemm K] [--out FILE]

Workload (seeded): prompt lengths 32-512, output lengths 16-256, random token ids, on the
~30 M-parameter Qwen2-shaped checkpoint of `vlmserve demo-checkpoint --size bench`, float32
on CPU. The engine runs as its real processes (scheduler + worker over ZeroMQ) with every
request submitted at once; transformers runs static batches of the same size, left-padded,
each generating as many tokens as its longest request. Both count only requested tokens.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time

import torch
import transformers
from report import write_json

from vlmserve.deploy.launcher import scheduler_and_workers
from vlmserve.frontend.offline import run_async
from vlmserve.shared.config import Config
from vlmserve.shared.messages import SamplingParams
from vlmserve.workers.demo_checkpoint import build_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def bench_checkpoint() -> str:
    path = os.path.join(HERE, ".cache", "qwen2-bench")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        print(f"building the benchmark checkpoint in {path} ...", flush=True)
        build_checkpoint(path, arch="qwen2", size="bench")
    return path


def workload(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randint(32, 512))], rng.randint(16, 256))
        for _ in range(n)
    ]


def run_engine(
    model_dir: str, work: list, batch: int, attention_backend: str, cpu_gemm: str
) -> dict:
    requests = [
        (prompt, SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True))
        for prompt, out in work
    ]
    with (
        tempfile.TemporaryDirectory() as tmp,
        scheduler_and_workers(
            model_dir,
            tmp,
            max_batch_size=batch,
            attention_backend=attention_backend,
            cpu_gemm=cpu_gemm,
        ) as eng,
    ):
        config = eng["config"]
        print("engine: warming up ...", flush=True)
        asyncio.run(run_async(config, requests[:4], timeout=600))
        print(f"engine: {len(requests)} requests at once ...", flush=True)

        async def measured() -> tuple:
            _, before = await run_async(config, [], timeout=600)
            started = time.perf_counter()
            results, after = await run_async(config, requests, timeout=1800)
            return results, before, after, time.perf_counter() - started

        results, before, after, wall = asyncio.run(measured())
    tokens = sum(len(r.token_ids) for r in results)
    steps = after.steps - before.steps
    sched = after.scheduler_s - before.scheduler_s
    step = after.step_s - before.step_s
    return {
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "steps": steps,
        "scheduler_ms_per_step": 1000 * sched / steps,
        "step_ms": 1000 * step / steps,
        "scheduler_overhead": sched / (sched + step),
        "preemptions": after.preemptions - before.preemptions,
    }


def run_transformers(model_dir: str, work: list, batch: int) -> dict:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = tok.pad_token_id
    tokens, started = 0, time.perf_counter()
    for first in range(0, len(work), batch):
        chunk = work[first : first + batch]
        longest = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p, _ in chunk])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p, _ in chunk])
        new = max(out for _, out in chunk)
        print(f"transformers: batch {first // batch + 1}, {len(chunk)} x {new} tokens", flush=True)
        with torch.no_grad():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False
            )
        tokens += sum(out for _, out in chunk)
    wall = time.perf_counter() - started
    return {"output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--attention-backend", default=Config().attention_backend)
    parser.add_argument("--cpu-gemm", default=Config().cpu_gemm, help="the engine's GEMM kernel")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "engine.json"))
    args = parser.parse_args()
    model_dir = bench_checkpoint()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    work = workload(args.requests, config.vocab_size, args.seed)
    ours = run_engine(model_dir, work, args.batch, args.attention_backend, args.cpu_gemm)
    theirs = None if args.skip_transformers else run_transformers(model_dir, work, args.batch)
    report = {
        "workload": {
            "requests": args.requests, "batch": args.batch, "seed": args.seed,
            "prompt_len": [32, 512], "output_len": [16, 256], "dtype": "float32",
            "torch_threads": torch.get_num_threads(),
            "attention_backend": args.attention_backend, "cpu_gemm": args.cpu_gemm,
        },
        "vlmserve": ours,
        "transformers": theirs,
        "speedup": ours["output_tok_s"] / theirs["output_tok_s"] if theirs else None,
    }  # fmt: skip
    print()
    t = theirs or {}
    rows = [
        ("output tokens/s", ours["output_tok_s"], t.get("output_tok_s"), "{:.0f}"),
        ("wall time (s)", ours["wall_s"], t.get("wall_s"), "{:.1f}"),
        ("step time (ms)", ours["step_ms"], None, "{:.1f}"),
        ("scheduler time/step (ms)", ours["scheduler_ms_per_step"], None, "{:.2f}"),
        ("scheduler overhead", ours["scheduler_overhead"], None, "{:.1%}"),
    ]
    print(f"| {'':26} | {'vlmserve':>10} | {'transformers':>12} |")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 14}|")
    for label, a, b, fmt in rows:
        theirs_cell = fmt.format(b) if b is not None else ""
        print(f"| {label:26} | {fmt.format(a):>10} | {theirs_cell:>12} |")
    if report["speedup"]:
        print(f"\nvlmserve / transformers output throughput: {report['speedup']:.2f}x")
    write_json(report, args.out)


if __name__ == "__main__":
    main()
