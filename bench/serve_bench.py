"""Serving benchmark: vlmserve's HTTP server against `transformers serve`, one after another on
the same checkpoint and the same workload, in the manner of `vllm bench serve`.

    .venv/bin/python bench/serve_bench.py [--num-prompts 64] [--input-len 220]
        [--output-len 128] [--max-concurrency 32] [--request-rate inf] [--out FILE]

Workload (seeded): one-turn chats of random vocabulary whose chat-templated prompt has
`--input-len` tokens under the checkpoint's tokenizer, each asking for `--output-len` tokens,
greedy, with EOS ignored so every output has that length; streamed from /v1/chat/completions
with Poisson arrivals at `--request-rate` (inf: all at once), at most `--max-concurrency` in
flight. Default checkpoint: the engine benchmark's ~30 M-parameter Qwen2, float32 on CPU.

`transformers serve` rejects `ignore_eos` and `min_tokens` (HTTP 422, unexpected fields), so
its requests disable EOS through its own `generation_config` request field (eos_token_id -1)
instead; the output tokens of both servers are taken from their usage chunk and checked
against `--output-len`. It needs `pip install fastapi uvicorn accelerate`; when it cannot
start, the report says so and why, and has no numbers for it.

Afterwards the engine alone (no HTTP, as bench/engine_bench.py drives it) runs the same prompt
token ids and output lengths, all submitted at once with its batch capped at the same
concurrency, to give the share of the engine's throughput that survives the HTTP path.
Servers bind 127.0.0.1 and are stopped at the end, on errors and on Ctrl-C or SIGTERM.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator

from engine_bench import bench_checkpoint
from report import free_port, write_json
from serve_client import Prompt, random_prompts, run_load, summarize

from vlmserve.deploy.launcher import scheduler_and_workers, server, stop, wait_healthy
from vlmserve.frontend.offline import run_async
from vlmserve.shared.config import Config, new_run_id
from vlmserve.shared.messages import SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))
# CPU paged-attention cache of `transformers serve --continuous-batching`: 512 x 32 tokens.
TRANSFORMERS_CB = ["--continuous-batching", "--cb-num-blocks", "512", "--cb-block-size", "32"]


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def vlmserve_server(model_dir: str, workdir: str, max_batch_size: int) -> Iterator[str]:
    config = Config(
        model=model_dir, run_id=new_run_id(), ipc_dir=workdir, server_name="127.0.0.1",
        server_port=free_port(), max_batch_size=max_batch_size, device="cpu", dtype="float32",
        log_level="WARNING",
    )  # fmt: skip
    log = os.path.join(workdir, "vlmserve.log")
    try:
        with server(config, log) as srv:
            yield srv["url"]
    except Exception:
        print(f"vlmserve log, last lines:\n{log_tail(log)}", flush=True)
        raise


@contextlib.contextmanager
def transformers_server(model_dir: str, workdir: str) -> Iterator[str]:
    # What `transformers serve` imports beyond this project's own dependencies.
    missing = [m for m in ("fastapi", "uvicorn", "accelerate") if not importlib.util.find_spec(m)]
    if missing:
        raise RuntimeError(f"transformers serve needs `pip install {' '.join(missing)}`")
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    cmd = [
        exe, "serve", model_dir, *TRANSFORMERS_CB, "--device", "cpu", "--dtype", "float32",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    # Offline: a local directory must be all it reads.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = os.path.join(workdir, "transformers.log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, {"transformers serve": proc}, timeout=300)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; its log ends:\n{log_tail(log)}") from exc
        yield url
    finally:
        stop(proc)


def served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
        return json.load(resp)["data"][0]["id"]


def payloads(model: str, prompts: list[Prompt], no_eos: dict) -> list[dict]:
    return [
        {
            "model": model,
            "messages": [{"role": "user", "content": p.text}],
            "stream": True,
            "max_tokens": p.output_len,
            "temperature": 0.0,
            "stream_options": {"include_usage": True},
            **no_eos,
        }
        for p in prompts
    ]


# How each server is told to ignore EOS (see the module docstring).
NO_EOS = {
    "vlmserve": {"ignore_eos": True},
    "transformers": {"generation_config": json.dumps({"eos_token_id": -1, "do_sample": False})},
}


def measure(name: str, url: str, prompts: list[Prompt], args: argparse.Namespace) -> dict:
    model = served_model(url)
    print(f"{name}: warming up ...", flush=True)
    warm = [dataclasses.replace(p, output_len=16) for p in prompts[:2]]
    outcomes, _ = asyncio.run(
        run_load(url, payloads(model, warm, NO_EOS[name]), float("inf"), None, 0, lambda _: None)
    )
    if not all(o.ok for o in outcomes):
        raise RuntimeError(f"warm-up failed: {[o.error for o in outcomes if not o.ok]}")
    n = len(prompts)
    step = max(1, n // 8)

    def progress(done: int) -> None:
        if done % step == 0 or done == n:
            print(f"{name}: {done}/{n} requests done", flush=True)

    print(f"{name}: {n} requests ...", flush=True)
    outcomes, wall = asyncio.run(
        run_load(
            url, payloads(model, prompts, NO_EOS[name]), args.request_rate,
            args.max_concurrency, args.seed, progress,
        )
    )  # fmt: skip
    # The 1-minute load average after the run: on a shared machine, what else was running.
    return {**summarize(outcomes, wall, prompts), "load_avg_1m": os.getloadavg()[0]}


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


ROWS = [
    ("successful requests", "completed", "{:.0f}"),
    ("duration (s)", "duration_s", "{:.1f}"),
    ("request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("output throughput (tok/s)", "output_throughput", "{:.1f}"),
    ("total throughput (tok/s)", "total_token_throughput", "{:.1f}"),
    ("output tokens", "output_tokens", "{:.0f}"),
] + [
    (f"{stat} {metric.upper()} (ms)", f"{stat}_{metric}_ms", "{:.1f}")
    for metric in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "p99")
]


def print_table(ours: dict, theirs: dict | None) -> None:
    t = theirs or {}
    print(f"| {'':26} | {'vlmserve':>10} | {'transformers':>12} | {'ratio':>6} |")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 14}|{'-' * 8}|")
    for label, key, fmt in ROWS:
        a, b = ours[key], t.get(key)
        theirs_cell = fmt.format(b) if b is not None else ""
        ratio = f"{a / b:.2f}" if b else ""
        print(f"| {label:26} | {fmt.format(a):>10} | {theirs_cell:>12} | {ratio:>6} |")
    print("ratio = vlmserve / transformers (above 1 is better for throughputs, worse for times)")


def run(args: argparse.Namespace) -> dict:
    model_dir = os.path.abspath(args.model) if args.model else bench_checkpoint()
    prompts = random_prompts(
        model_dir, args.num_prompts, args.input_len, args.output_len, args.seed
    )
    lengths = [len(p.token_ids) for p in prompts]
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        print("vlmserve: starting ...", flush=True)
        with vlmserve_server(model_dir, tmp, args.max_batch_size) as url:
            ours = measure("vlmserve", url, prompts, args)
        theirs, failure = None, None
        if not args.skip_transformers:
            print("transformers serve: starting ...", flush=True)
            try:
                with transformers_server(model_dir, tmp) as url:
                    theirs = measure("transformers", url, prompts, args)
            except Exception as exc:  # reported, not faked: the table shows no numbers
                failure = f"{type(exc).__name__}: {exc}"
                print(f"transformers serve failed: {failure}", flush=True)

    offline = None
    if not args.skip_offline:
        batch = min(args.max_concurrency or args.max_batch_size, args.max_batch_size)
        offline = offline_engine(model_dir, prompts, batch)

    return {
        "workload": {
            "model": model_dir, "num_prompts": args.num_prompts, "input_len": args.input_len,
            "prompt_tokens": [min(lengths), max(lengths)], "output_len": args.output_len,
            "max_concurrency": args.max_concurrency, "request_rate": str(args.request_rate),
            "seed": args.seed, "dtype": "float32", "device": "cpu",
            "vlmserve_max_batch_size": args.max_batch_size,
            "transformers_flags": TRANSFORMERS_CB, "no_eos": NO_EOS,
        },
        "vlmserve": ours,
        "transformers": theirs,
        "transformers_failure": failure,
        "offline_engine": offline,
        "output_throughput_ratio": (
            ours["output_throughput"] / theirs["output_throughput"] if theirs else None
        ),
        "http_over_offline": (
            ours["output_throughput"] / offline["output_tok_s"] if offline else None
        ),
    }  # fmt: skip


def print_report(report: dict) -> None:
    ours, theirs, offline = report["vlmserve"], report["transformers"], report["offline_engine"]
    print()
    print_table(ours, theirs)
    for name, result in (("vlmserve", ours), ("transformers", theirs)):
        if result:
            print(
                f"{name}: output tokens from {result['output_tokens_counted_by']}; "
                f"{result['short_outputs']} short of and {result['long_outputs']} longer than "
                f"{report['workload']['output_len']}; {result['failed']} failed "
                f"{result['errors'] or ''}"
            )
    if report["transformers_failure"]:
        print(f"transformers serve: no numbers, it failed: {report['transformers_failure']}")
    if offline:
        print(
            f"vlmserve HTTP / offline engine output throughput: {report['http_over_offline']:.2f}"
            f" ({ours['output_throughput']:.1f} / {offline['output_tok_s']:.1f} tok/s,"
            f" offline batch {offline['batch']})"
        )


def raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the bench one)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=220)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-concurrency", type=int, default=32, help="0: no cap")
    parser.add_argument("--request-rate", type=float, default=float("inf"))
    parser.add_argument("--max-batch-size", type=int, default=64, help="vlmserve's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "serve.json"))
    args = parser.parse_args()
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
