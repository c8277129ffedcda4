"""Saturation benchmark: offered load against achieved tokens/s and TTFT, with and without
queue caps.

    .venv/bin/python bench/saturation_bench.py [--duration 20] [--input-len 128]
        [--output-len 32] [--max-batch-size 16] [--max-queued-requests 16] [--out FILE]

First the engine's capacity: `--max-batch-size` x 4 requests sent at once to the uncapped
server, completed requests per second. Then, for each load factor (0.5x, 1x, 2x, 4x of that
rate), Poisson arrivals at factor x capacity for `--duration` seconds with no client-side limit on
requests in flight (open loop, as real traffic is), against a server without caps and then
against one started with `--max-queued-requests` (past it, a request gets 503 at once). Both
servers run side by side, each level goes to one and then the other, with fresh prompts per
level (the same for both), so the two see the same machine and no prefix-cache hits.
Per run: achieved output tokens/s, p50/p99 TTFT of the accepted requests, how many were
refused. Past capacity, an uncapped server queues everything and TTFT grows with the
backlog; a capped one refuses the excess and keeps the TTFT of what it accepts bounded.

Workload as bench/serve_bench.py's: one-turn chats of random vocabulary of `--input-len`
templated tokens, `--output-len` tokens each (EOS ignored), streamed, greedy; the engine
benchmark's ~30 M-parameter Qwen2, float32 on CPU. Prints a table, writes JSON and a PNG
(matplotlib, in the `bench` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from engine_bench import bench_checkpoint
from report import free_port, write_json
from serve_bench import NO_EOS, payloads
from serve_client import Outcome, random_prompts, run_load

from vlmserve.deploy.launcher import server
from vlmserve.shared.config import Config, new_run_id

HERE = os.path.dirname(os.path.abspath(__file__))
FACTORS = (0.5, 1.0, 2.0, 4.0)
MODEL_NAME = "qwen2-bench"


@contextlib.contextmanager
def started(model: str, workdir: str, args: argparse.Namespace, caps: bool) -> Iterator[str]:
    config = Config(
        model=model, model_name=MODEL_NAME, run_id=new_run_id(), ipc_dir=workdir,
        server_name="127.0.0.1", server_port=free_port(), max_batch_size=args.max_batch_size,
        device="cpu", dtype="float32", log_level="WARNING",
        max_queued_requests=args.max_queued_requests if caps else 0,
    )  # fmt: skip
    with server(config, os.path.join(workdir, f"server-{'caps' if caps else 'open'}.log")) as srv:
        yield srv["url"]


def quiet(_: int) -> None:
    pass


def run_level(url: str, bodies: list[dict], rate: float, seed: int) -> dict:
    outcomes, wall = asyncio.run(run_load(url, bodies, rate, None, seed, quiet))
    return summarize(outcomes, wall, rate)


def summarize(outcomes: list[Outcome], wall: float, rate: float) -> dict:
    ok = [o for o in outcomes if o.ok]
    refused = [o for o in outcomes if o.error.startswith("HTTP 503")]
    ttft = np.asarray([o.ttft for o in ok]) if ok else np.zeros(1)
    return {
        "offered_rps": rate,
        "sent": len(outcomes),
        "completed": len(ok),
        "refused_503": len(refused),
        "other_failures": len(outcomes) - len(ok) - len(refused),
        "errors": sorted({o.error[:120] for o in outcomes if not o.ok and o not in refused})[:3],
        "duration_s": wall,
        "output_tok_s": sum(o.output_tokens for o in ok) / wall,
        "p50_ttft_s": float(np.percentile(ttft, 50)),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
    }


def measure_capacity(url: str, bodies: list[dict]) -> float:
    """Completed requests per second with all of `bodies` sent at once."""
    outcomes, wall = asyncio.run(run_load(url, bodies, float("inf"), None, 0, quiet))
    failed = [o.error for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"capacity run: {len(failed)} failed, e.g. {failed[0]}")
    return len(outcomes) / wall


def run(args: argparse.Namespace) -> dict:
    model = bench_checkpoint()

    def bodies_for(count: int, seed: int) -> list[dict]:
        # Distinct random prompts: a repeated one would be served from the prefix cache.
        prompts = random_prompts(model, count, args.input_len, args.output_len, seed=seed)
        return payloads(MODEL_NAME, prompts, NO_EOS["vlmserve"])

    report: dict = {"settings": vars(args) | {"factors": FACTORS}, "runs": {}}
    names = {False: "without caps", True: "with caps"}
    with tempfile.TemporaryDirectory(prefix="vlmsat-") as workdir, contextlib.ExitStack() as stack:
        # Both servers run side by side (an idle one costs next to nothing) and each load
        # level goes to one and then the other: this machine's speed drifts with whatever
        # else runs on it, and back to back the two see the same conditions.
        urls = {caps: stack.enter_context(started(model, workdir, args, caps)) for caps in names}
        warm = bodies_for(args.max_batch_size, seed=1)  # pays for allocation and warm-up
        for url in urls.values():
            measure_capacity(url, warm)
        capacity = measure_capacity(urls[False], bodies_for(args.max_batch_size * 4, seed=2))
        report["capacity_rps"] = capacity
        print(f"capacity: {capacity:.2f} requests/s", flush=True)
        counts = [max(4, int(f * capacity * args.duration)) for f in FACTORS]
        bodies = bodies_for(sum(counts), seed=3)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        rows: dict[bool, list[dict]] = {False: [], True: []}
        for i, factor in enumerate(FACTORS):
            # Fresh prompts per level (the prefix cache would serve repeated ones); the same
            # ones for both servers.
            level = bodies[starts[i] : starts[i] + counts[i]]
            for caps, url in urls.items():
                row = {"factor": factor, **run_level(url, level, factor * capacity, i)}
                rows[caps].append(row)
                print_row(names[caps], row)
                time.sleep(1.0)  # let the engine empty before the next run
        report["runs"] = {names[caps]: rows[caps] for caps in names}
    return report


def print_row(name: str, row: dict) -> None:
    print(
        f"{name:>13} {row['factor']:>4}x {row['offered_rps']:7.2f} req/s offered: "
        f"{row['completed']:4d} done, {row['refused_503']:4d} refused, "
        f"{row['output_tok_s']:7.1f} tok/s, TTFT p50 {row['p50_ttft_s']:6.2f} s "
        f"p99 {row['p99_ttft_s']:6.2f} s",
        flush=True,
    )


def table(report: dict) -> str:
    lines = [
        "| caps | load | offered req/s | completed | refused (503) | output tok/s | "
        "TTFT p50 s | TTFT p99 s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in report["runs"].items():
        for r in rows:
            lines.append(
                f"| {name} | {r['factor']}x | {r['offered_rps']:.2f} | {r['completed']} | "
                f"{r['refused_503']} | {r['output_tok_s']:.1f} | {r['p50_ttft_s']:.2f} | "
                f"{r['p99_ttft_s']:.2f} |"
            )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tok, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, rows), color in zip(report["runs"].items(), ("tab:red", "tab:blue"), strict=True):
        factors = [r["factor"] for r in rows]
        tok.plot(factors, [r["output_tok_s"] for r in rows], marker="o", color=color, label=name)
        p99, p50 = [r["p99_ttft_s"] for r in rows], [r["p50_ttft_s"] for r in rows]
        ttft.plot(factors, p99, marker="o", color=color, label=f"{name}, p99")
        ttft.plot(factors, p50, marker=".", ls="--", color=color, label=f"{name}, p50")
    tok.set(xlabel="offered load (x capacity)", ylabel="achieved output tokens/s", xscale="log")
    ttft.set(xlabel="offered load (x capacity)", ylabel="TTFT of accepted requests (s)")
    ttft.set_xscale("log")
    for ax in (tok, ttft):
        ax.set_xticks(FACTORS, [f"{f}x" for f in FACTORS])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    caps = report["settings"]["max_queued_requests"]
    fig.suptitle(
        f"vlmserve saturation: capacity {report['capacity_rps']:.2f} req/s, "
        f"caps = --max-queued-requests {caps}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load level")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queued-requests", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "saturation.json"))
    args = parser.parse_args()
    report = run(args)
    report["table"] = table(report)
    print(report["table"])
    write_json(report, args.out)
    plot(report, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    sys.exit(main())
