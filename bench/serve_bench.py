"""Serving benchmark: vlmserve against vLLM's CPU build (and optionally `transformers serve`),
each started by the benchmark on the same checkpoint, measured on the same workload in one run,
in alternating rounds, with the machine's same-day ceilings printed beside them.

    .venv/bin/python bench/serve_bench.py [--concurrency 1,8,32] [--rounds 2]
        [--peers vllm[,transformers]] [--input-len 360] [--output-len 128]
        [--skip-images] [--skip-ceiling] [--skip-offline] [--out FILE]

Text workload (issue 10), in the manner of `vllm bench serve`: at each concurrency c, 2c
(at least 16) one-turn chats of random vocabulary whose chat-templated prompt has `--input-len`
tokens, each asking for `--output-len` tokens, greedy, EOS ignored; streamed from
/v1/chat/completions, all sent at once with at most c in flight. Every round uses fresh prompts
(no prefix-cache hits), sent to every server, the order flipped each round. Default checkpoint:
q30m, the engine benchmark's ~30 M-parameter Qwen2 (hidden 512, 12 layers, 8 heads, 2 KV heads,
vocab 4096), float32 on CPU. vLLM runs with its defaults except float32, --enforce-eager and its
OpenMP threads bound to every core (`--vllm-threads`).

Then the image workload (bench/image_bench.py's `peer_comparison`: a tiny LLaVA, one
640x480 image per chat, 64 output tokens, c=16) against the same peers, and the ceilings
(bench/ceiling.py: lean decode step, GEMMs alone, lean prefill, 2048^3 GEMM, and the workload
limit they imply). Last, unless skipped, the engine alone (no HTTP) on the largest
concurrency's last-round prompts, for the share of its throughput the HTTP path keeps.
Servers bind 127.0.0.1 and are stopped at the end, on errors and on Ctrl-C or SIGTERM.
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile

import ceiling
import image_bench
from engine_bench import bench_checkpoint
from peers import aggregate, alternate, print_table, start_servers, warm_up
from report import write_json
from serve_client import Prompt, random_prompts
from vllm_peer import DEFAULT_VENV

from vlmserve.deploy.launcher import scheduler_and_workers
from vlmserve.frontend.offline import run_async
from vlmserve.shared.messages import SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))


def chat_bodies(prompts: list[Prompt]) -> list[dict]:
    return [
        {
            "messages": [{"role": "user", "content": p.text}],
            "stream": True,
            "max_tokens": p.output_len,
            "temperature": 0.0,
            "stream_options": {"include_usage": True},
        }
        for p in prompts
    ]


def text_comparison(model_dir: str, args: argparse.Namespace, report: dict) -> dict:
    """Every concurrency, `args.rounds` alternating rounds each, on servers started here.
    The report so far is written after each concurrency: a run cut short keeps its figures."""
    result: dict = {"per_round": {}, "summary": {}, "peer_failures": {}, "last_prompts": []}
    names = ["vlmserve", *args.peers]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        urls, result["peer_failures"] = start_servers(
            stack, names, model_dir, tmp, args.max_batch_size, args.vllm_venv, args.vllm_threads
        )
        warm = random_prompts(model_dir, 2, args.input_len, 16, seed=args.seed + 999_999)
        warm_up(urls, chat_bodies(warm), warm)
        for c in args.concurrency:
            n = max(args.min_prompts, 2 * c)

            def workload(r: int, c: int = c, n: int = n) -> tuple[list[dict], list[Prompt]]:
                # Fresh prompts for every concurrency and round, the same for every server.
                seed = args.seed + 1000 * c + r
                prompts = random_prompts(model_dir, n, args.input_len, args.output_len, seed)
                result["last_prompts"] = prompts
                return chat_bodies(prompts), prompts

            per_round = alternate(urls, args.rounds, c, workload, label=f"text c={c}")
            result["per_round"][c] = per_round
            result["summary"][c] = aggregate(per_round)
            print_table(f"text, c={c} (so far)", {c: result["summary"][c]})
            partial = {k: v for k, v in result.items() if k != "last_prompts"}
            write_json({**report, "text": partial, "partial": True}, args.out)
    return result


def offline_engine(model_dir: str, prompts: list[Prompt], batch: int) -> dict:
    """The same prompt ids and output lengths through the engine alone (no HTTP), all
    submitted at once with the batch capped at the HTTP run's concurrency. Timed from the
    submission to the last finish (each request's elapsed time starts when it is submitted),
    so connecting the engine client is not counted, unlike engine_bench's `run_engine`."""
    requests = [
        (p.token_ids, SamplingParams(max_tokens=p.output_len, temperature=0.0, ignore_eos=True))
        for p in prompts
    ]
    settings = {"max_batch_size": batch, "device": "cpu", "dtype": "float32"}
    with (
        tempfile.TemporaryDirectory() as tmp,
        scheduler_and_workers(model_dir, tmp, **settings) as eng,
    ):
        print("offline engine: warming up ...", flush=True)
        asyncio.run(run_async(eng["config"], requests[:2], timeout=600))
        print(f"offline engine: {len(requests)} requests at once ...", flush=True)
        results, _ = asyncio.run(run_async(eng["config"], requests, timeout=3600))
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"offline engine: {len(errors)} requests failed: {errors[:3]}")
    tokens = sum(len(r.token_ids) for r in results)
    wall = max(r.elapsed for r in results)
    return {
        "batch": batch, "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
        "load_avg_1m": os.getloadavg()[0],
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    model_dir = os.path.abspath(args.model) if args.model else bench_checkpoint()
    report: dict = {
        "workload": {
            "model": model_dir, "concurrency": args.concurrency, "rounds": args.rounds,
            "requests_per_round": {c: max(args.min_prompts, 2 * c) for c in args.concurrency},
            "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed,
            "dtype": "float32", "device": "cpu", "peers": args.peers,
            "vlmserve_max_batch_size": args.max_batch_size,
            "vllm_threads_bind": args.vllm_threads or f"0-{(os.cpu_count() or 1) - 1}",
            "cpus": os.cpu_count(),
        },
        "load_avg_start": os.getloadavg(),
    }  # fmt: skip
    if not args.skip_ceiling:
        shape = ceiling.Shape.from_config(model_dir)
        context = args.input_len + args.output_len // 2
        report["ceiling"] = ceiling.measure(
            shape, args.concurrency, context, args.input_len, args.output_len
        )
        ceiling.print_report(report["ceiling"])
    text = text_comparison(model_dir, args, report)
    last_prompts = text.pop("last_prompts")
    report["text"] = text
    if not args.skip_images:
        report["images"] = image_bench.peer_comparison(
            args.peers, rounds=args.rounds, venv=args.vllm_venv, threads=args.vllm_threads
        )
    if not args.skip_offline and last_prompts:
        batch = min(max(args.concurrency), args.max_batch_size)
        report["offline_engine"] = offline_engine(model_dir, last_prompts, batch)
    report["load_avg_end"] = os.getloadavg()
    return report


def print_report(report: dict) -> None:
    ceil = report.get("ceiling")
    if ceil:
        ceiling.print_report(ceil)
    text = report["text"]
    print_table(
        f"text: q30m float32, {report['workload']['input_len']} prompt / "
        f"{report['workload']['output_len']} output tokens, ignore_eos, unique prompts",
        text["summary"],
    )
    if ceil:
        for c, servers in text["summary"].items():
            limit = ceil["workload_limit_tok_s"].get(c)
            if limit:
                shares = ", ".join(
                    f"{name} {row['output_tok_s'] / limit:.2f}" for name, row in servers.items()
                )
                print(f"c={c}: share of the workload limit ({limit:.0f} tok/s): {shares}")
    for name, why in text["peer_failures"].items():
        print(f"{name}: no figures, it failed to start: {why}")
    images = report.get("images")
    if images:
        image_bench.print_peer_report(images)
    offline = report.get("offline_engine")
    if offline:
        c = offline["batch"]
        ours = text["summary"].get(c, {}).get("vlmserve")
        if ours:
            print(
                f"vlmserve HTTP / offline engine at c={c}: "
                f"{ours['output_tok_s'] / offline['output_tok_s']:.2f} "
                f"({ours['output_tok_s']:.1f} / {offline['output_tok_s']:.1f} tok/s)"
            )
    start, end = report["load_avg_start"], report["load_avg_end"]
    print(
        f"load average (1/5/15 min) at start {start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f}, "
        f"at end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f} on {report['workload']['cpus']} cores"
    )


def raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: q30m)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-prompts", type=int, default=16, help="requests per round, at least")
    parser.add_argument("--input-len", type=int, default=360)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--peers", default="vllm", help="comma list of vllm, transformers")
    parser.add_argument("--max-batch-size", type=int, default=64, help="vlmserve's")
    parser.add_argument("--vllm-venv", default=DEFAULT_VENV)
    parser.add_argument("--vllm-threads", default=None, help="cores for vLLM (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "serve.json"))
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.peers = [p for p in args.peers.split(",") if p]
    # SIGTERM unwinds like Ctrl-C, so every server's context stops its processes.
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        report = run(args)
    except KeyboardInterrupt:
        sys.exit("interrupted; the servers are stopped")
    print_report(report)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
