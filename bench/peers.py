"""Servers to compare and the comparison itself: vlmserve, vLLM's CPU build and `transformers
serve`, each started by the benchmark on one checkpoint, then measured on the same workload in
alternating rounds (round r sends the same fresh requests to every server, the order flipped
each round, so drifting load on a shared machine falls on all of them alike).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator

from report import free_port, log_tail
from serve_client import Prompt, run_load, summarize
from vllm_peer import DEFAULT_VENV, vllm_server

from vlmserve.deploy.launcher import server, stop, wait_healthy
from vlmserve.shared.config import Config, new_run_id

PEERS = ("vllm", "transformers")
# CPU paged-attention cache of `transformers serve --continuous-batching`: 512 x 32 tokens.
TRANSFORMERS_CB = ["--continuous-batching", "--cb-num-blocks", "512", "--cb-block-size", "32"]
# What each server is sent beside the OpenAI fields so every output has its full length.
# `transformers serve` rejects ignore_eos (HTTP 422) and takes its own generation_config.
EXTRA_FIELDS = {
    "vlmserve": {"ignore_eos": True},
    "vllm": {"ignore_eos": True},
    "transformers": {"generation_config": json.dumps({"eos_token_id": -1, "do_sample": False})},
}


@contextlib.contextmanager
def vlmserve_server(model_dir: str, workdir: str, max_batch_size: int = 64) -> Iterator[str]:
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


def start_servers(
    stack: contextlib.ExitStack, names: list[str], model_dir: str, workdir: str,
    max_batch_size: int = 64, vllm_venv: str = DEFAULT_VENV, vllm_threads: str | None = None,
) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    """Start every named server on `model_dir` inside `stack` (stopped when it closes).
    Returns the URLs of those that started and, for a peer that did not, why: its figures are
    then absent from the report, never faked. vlmserve failing to start is an error."""
    urls, failures = {}, {}
    for name in names:
        print(f"{name}: starting ...", flush=True)
        try:
            if name == "vlmserve":
                ctx = vlmserve_server(model_dir, workdir, max_batch_size)
            elif name == "vllm":
                ctx = vllm_server(model_dir, workdir, vllm_venv, vllm_threads)
            elif name == "transformers":
                ctx = transformers_server(model_dir, workdir)
            else:
                raise ValueError(f"unknown server {name!r}; known: vlmserve, {', '.join(PEERS)}")
            urls[name] = stack.enter_context(ctx)
        except Exception as exc:
            if name == "vlmserve":
                raise
            failures[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: failed to start, no figures for it: {failures[name]}", flush=True)
    return urls, failures


def served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
        return json.load(resp)["data"][0]["id"]


def bodies_for(name: str, url: str, bodies: list[dict], extra: dict | None = None) -> list[dict]:
    """The workload's request bodies as sent to server `name`: its model id and its fields."""
    model = served_model(url)
    fields = {**EXTRA_FIELDS[name], **(extra or {})}
    return [{**body, "model": model, **fields} for body in bodies]


def send(
    name: str, url: str, bodies: list[dict], prompts: list[Prompt], concurrency: int, label: str
) -> dict:
    """All bodies at once, at most `concurrency` in flight; vLLM-style metrics of the run."""
    n = len(bodies)
    step = max(1, n // 4)

    def progress(done: int) -> None:
        if done % step == 0 or done == n:
            print(f"  {label} {name}: {done}/{n} done", flush=True)

    outcomes, wall = asyncio.run(run_load(url, bodies, float("inf"), concurrency, 0, progress))
    # The 1-minute load average after the run: on a shared machine, what else was running.
    return {**summarize(outcomes, wall, prompts), "load_avg_1m": os.getloadavg()[0]}


def alternate(
    urls: dict[str, str], rounds: int, concurrency: int,
    workload: Callable[[int], tuple[list[dict], list[Prompt]]],
    extra: dict[str, dict] | None = None, label: str = "",
) -> dict[str, list[dict]]:  # fmt: skip
    """`rounds` rounds; round r sends workload(r) to every server, in an order that flips each
    round. Returns each server's per-round metrics."""
    results: dict[str, list[dict]] = {name: [] for name in urls}
    names = list(urls)
    for r in range(rounds):
        bodies, prompts = workload(r)
        for name in names if r % 2 == 0 else names[::-1]:
            sent = bodies_for(name, urls[name], bodies, (extra or {}).get(name))
            print(f"{label} round {r + 1}/{rounds}: {name}, {len(bodies)} requests ...", flush=True)
            results[name].append(send(name, urls[name], sent, prompts, concurrency, label))
    return results


def warm_up(urls: dict[str, str], bodies: list[dict], prompts: list[Prompt]) -> None:
    """A couple of short requests per server first: lazy imports, first allocations."""
    for name, url in urls.items():
        result = send(name, url, bodies_for(name, url, bodies), prompts, len(bodies), "warm-up")
        if result["failed"]:
            raise RuntimeError(f"{name}: warm-up failed: {result['errors']}")


def aggregate(per_round: dict[str, list[dict]], ours: str = "vlmserve") -> dict:
    """Per server: each round's output tok/s and TTFT p50, their means, and the ratios of
    ours to each peer's (throughput: above 1 is ours faster; TTFT: below 1 is ours sooner)."""
    out = {}
    for name, rounds in per_round.items():
        tok_s = [r["output_throughput"] for r in rounds]
        ttft = [r["median_ttft_ms"] / 1000 for r in rounds]
        out[name] = {
            "output_tok_s_rounds": tok_s, "output_tok_s": statistics.fmean(tok_s),
            "ttft_p50_s_rounds": ttft, "ttft_p50_s": statistics.fmean(ttft),
            "failed": sum(r["failed"] for r in rounds),
            "errors": sorted({e for r in rounds for e in r["errors"]})[:5],
            "short_outputs": sum(r["short_outputs"] for r in rounds),
            "long_outputs": sum(r["long_outputs"] for r in rounds),
            "prompt_tokens_per_request": statistics.fmean(
                r["prompt_tokens"] / max(1, r["completed"]) for r in rounds
            ),
            "load_avg_1m": [r["load_avg_1m"] for r in rounds],
        }  # fmt: skip
    if ours in out:
        for name, row in out.items():
            if name != ours and row["output_tok_s"] and row["ttft_p50_s"]:
                row["ours_over_this_tok_s"] = out[ours]["output_tok_s"] / row["output_tok_s"]
                row["ours_over_this_ttft"] = out[ours]["ttft_p50_s"] / row["ttft_p50_s"]
    return out


def print_table(title: str, by_concurrency: dict[int, dict]) -> None:
    """One row per concurrency and server: per-round figures, their mean, ratios vs ours."""
    print(f"\n{title}")
    head = ("c", "server", "out tok/s per round", "mean", "ours/this", "TTFT p50 s per round",
            "mean", "ours/this", "prompt tok", "failed")  # fmt: skip
    widths = (3, 12, 22, 7, 9, 22, 6, 9, 10, 6)
    print("| " + " | ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c, servers in by_concurrency.items():
        for name, row in servers.items():
            ratio = row.get("ours_over_this_tok_s")
            ttft_ratio = row.get("ours_over_this_ttft")
            cells = (
                str(c), name, " / ".join(f"{v:.1f}" for v in row["output_tok_s_rounds"]),
                f"{row['output_tok_s']:.1f}", f"{ratio:.2f}" if ratio else "",
                " / ".join(f"{v:.2f}" for v in row["ttft_p50_s_rounds"]),
                f"{row['ttft_p50_s']:.2f}", f"{ttft_ratio:.2f}" if ttft_ratio else "",
                f"{row['prompt_tokens_per_request']:.0f}", str(row["failed"]),
            )  # fmt: skip
            print("| " + " | ".join(f"{x:>{w}}" for x, w in zip(cells, widths, strict=True)) + " |")
    print("ours/this: vlmserve's mean over this server's (tok/s: above 1 is vlmserve faster; "
          "TTFT: below 1 is vlmserve sooner)")  # fmt: skip
    for servers in by_concurrency.values():
        for name, row in servers.items():
            if row["failed"] or row["short_outputs"] or row["long_outputs"]:
                print(
                    f"WARNING {name}: {row['failed']} failed {row['errors']}, "
                    f"{row['short_outputs']} short, {row['long_outputs']} long outputs"
                )
