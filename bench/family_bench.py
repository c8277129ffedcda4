"""Per-family image benchmark: every vision family's tiny demo checkpoint, 1 and 3 images per
request, the workers' encoder cache on and off.

    .venv/bin/python bench/family_bench.py [--families qwen2_vl,llava] [--num-requests 12]
    .venv/bin/python bench/family_bench.py --quick --families qwen2_vl,llava   # the test's run

The families are the `--arch` choices of `vlmserve demo-checkpoint` less its plain text ones,
read from the builder itself, so a family the builder learns joins this benchmark with nothing
to add here. Each checkpoint is built fresh into a temporary folder by the same command; one
whose frontend takes no images (a text-only Gemma 3) is listed as skipped; the others are
served twice: with the encoder cache (--encoder-cache-mb 1024) and without (0).

Each server gets a warm-up, then one run per image count: --num-requests streamed chats, at
most --concurrency in flight, each showing 1 (or 3) seeded random PNGs drawn from a pool of
--distinct-images (sizes from --image-sizes; one pool per image count, so a run never hits
images the other cached), --output-len tokens with EOS ignored. Every chat starts with a
system turn of its own ("Request 17."), so the prefix cache cannot reuse the blocks that hold
a repeated image: what a repeat saves is the encoder cache's doing. Figures per run:
requests/s, output tok/s, TTFT p50/p95 (client side), and the frontend's preprocessing time
per image twice: as the server's /metrics saw it under this load (fetch of the data URL,
decode, the model's processor, placeholder expansion, prompt rendering; per request divided
by its images), and alone in this process (image_bench.preprocessing_ms). A progress line per
run, a table, and JSON (default results/families.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx2
import numpy as np
from image_bench import image_pool, payloads, preprocessing_ms
from prometheus_client.parser import text_string_to_metric_families
from report import free_port, write_json
from serve_client import Prompt, run_load, summarize

from vlmserve.deploy.launcher import server
from vlmserve.frontend.prompts import Prompter
from vlmserve.shared.config import Config, new_run_id
from vlmserve.workers import demo_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = dict(num_requests=3, distinct_images=2, image_sizes="320x240", output_len=4,
             concurrency=3)  # fmt: skip


def builder_families() -> list[str]:
    """The builder's --arch choices in its order (its --help), less its plain text ARCHES: the
    candidates. One whose checkpoint takes no images (a text Gemma 3) is found out built."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        demo_checkpoint.main(["--help"])
    match = re.search(r"--arch \{([^}]*)\}", text.getvalue())
    if match is None:
        raise RuntimeError("vlmserve demo-checkpoint --help lists no --arch choices")
    return [a for a in match.group(1).split(",") if a not in demo_checkpoint.ARCHES]


def build_family(arch: str, out_dir: str) -> str:
    """`vlmserve demo-checkpoint out_dir --arch arch`, in this process, quietly."""
    root = logging.getLogger()
    level = root.level
    with contextlib.redirect_stdout(io.StringIO()):
        demo_checkpoint.main([out_dir, "--arch", arch])
    root.setLevel(level)  # its main() sets INFO for everything (httpx would log each request)
    return out_dir


def takes_images(model_dir: str) -> bool:
    """What the frontend asks before it takes an image part (frontend/routes/chat.py)."""
    return Prompter(model_dir, 4096).images is not None


def chats(n: int, per_request: int, pool: list[bytes], output_len: int, seed: int) -> list[dict]:
    """`n` streamed chats, each its own system turn, then `per_request` pool images and text."""
    rng = random.Random(seed)
    requests = [[rng.randrange(len(pool)) for _ in range(per_request)] for _ in range(n)]
    return payloads(requests, pool, output_len, model=None, system=f"Request {seed}-")


def image_metrics(url: str) -> tuple[float, float]:
    """The frontends' (all workers') total image preprocessing seconds and images so far."""
    text = httpx2.get(url + "/metrics", timeout=30.0, trust_env=False).text
    found = {"vlmserve:image_preprocessing_seconds_sum": 0.0, "vlmserve:images_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name] += sample.value
    return found["vlmserve:image_preprocessing_seconds_sum"], found["vlmserve:images_total"]


def measure(url: str, bodies: list[dict], concurrency: int, output_len: int) -> dict:
    """One run's client-side figures and the server's preprocessing time per image."""
    seconds_before, images_before = image_metrics(url)
    outcomes, wall = asyncio.run(run_load(url, bodies, float("inf"), concurrency, 0, lambda _: 0))
    seconds_after, images_after = image_metrics(url)
    result = summarize(outcomes, wall, [Prompt("", [], output_len)] * len(bodies))
    ttfts = [o.ttft * 1000 for o in outcomes if o.ok] or [0.0]
    images = images_after - images_before
    return {
        "requests_per_s": result["request_throughput"],
        "output_tok_s": result["output_throughput"],
        "ttft_p50_ms": float(np.percentile(ttfts, 50)),
        "ttft_p95_ms": float(np.percentile(ttfts, 95)),
        "server_preprocess_ms_per_image": (seconds_after - seconds_before) * 1000 / max(images, 1),
        "prompt_tokens_per_request": result["prompt_tokens"] / max(result["completed"], 1),
        "output_tokens": result["output_tokens"],
        "completed": result["completed"],
        "failed": result["failed"],
        "errors": result["errors"],
        "duration_s": wall,
    }


def start_servers(configs: list[Config], tmp: str) -> tuple[contextlib.ExitStack, list[str]]:
    """A server per config, started at once (a start is ~15 s of imports and loading here, much
    of it waiting); their URLs, and the stack that stops them."""
    managers = [server(c, os.path.join(tmp, f"server-{c.run_id}.log")) for c in configs]
    stack = contextlib.ExitStack()
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(m.__enter__) for m in managers]
    for manager, future in zip(managers, futures, strict=True):
        if future.exception() is None:
            stack.push(manager.__exit__)
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        stack.close()
        raise failed[0]
    return stack, [f.result()["url"] for f in futures]


def bench_family(
    model_dir: str, tmp: str, args: argparse.Namespace, sizes: list,
    stopping: list[threading.Thread],
) -> Iterator[dict]:  # fmt: skip
    """Serve the checkpoint with the encoder cache on and off; a row per (images, cache).

    The two servers start together, while the last family's stop in the background (a stop
    is mostly waiting on Gunicorn); nothing is measured until those have stopped, and these
    are left to stop the same way (joined from `stopping`), then `tmp` removed."""
    arch = os.path.basename(model_dir)
    try:
        pools = {k: image_pool(args.distinct_images, sizes, args.seed + k) for k in (1, 3)}
        alone = preprocessing_ms(model_dir, pools[1])
        configs = [
            Config(
                model=model_dir,
                run_id=new_run_id(),
                ipc_dir=tmp,
                server_name="127.0.0.1",
                server_port=free_port(),
                encoder_cache_mb=cache_mb,
                log_level="WARNING",
            )  # fmt: skip
            for cache_mb in (1024, 0)
        ]
        stack, urls = start_servers(configs, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def stop() -> None:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        for thread in stopping:
            thread.join()
        warm = chats(2, 1, image_pool(2, [(64, 64)], args.seed + 99), 2, args.seed + 99)
        for config, url in zip(configs, urls, strict=True):
            asyncio.run(run_load(url, warm, float("inf"), None, 0, lambda _: 0))
            for per_request in (1, 3):
                seed = args.seed + 1000 * per_request
                bodies = chats(args.num_requests, per_request, pools[per_request],
                               args.output_len, seed)  # fmt: skip
                row = {"family": arch, "images_per_request": per_request,
                       "encoder_cache": "on" if config.encoder_cache_mb else "off"}  # fmt: skip
                row |= measure(url, bodies, args.concurrency, args.output_len)
                row["alone_preprocess_ms_per_image"] = alone["median_ms"]
                yield row
    finally:
        stopping.append(threading.Thread(target=stop, name=f"stop {arch}"))
        stopping[-1].start()


def print_table(rows: list[dict]) -> None:
    """One line per family and image count, cache on / off side by side."""
    print("\n| family | images | req/s on / off | out tok/s on / off | TTFT p50 ms on / off "
          "| TTFT p95 ms on / off | prompt tokens | prep ms/image (server / alone) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    pairs: dict[tuple[str, int], dict[str, dict]] = {}
    for row in rows:
        pairs.setdefault((row["family"], row["images_per_request"]), {})[row["encoder_cache"]] = row
    for (family, images), pair in pairs.items():
        on, off = pair["on"], pair["off"]

        def both(key: str, fmt: str) -> str:
            return f"{on[key]:{fmt}} / {off[key]:{fmt}}"  # noqa: B023

        print(f"| {family} | {images} | {both('requests_per_s', '.2f')} | "
              f"{both('output_tok_s', '.1f')} | {both('ttft_p50_ms', '.0f')} | "
              f"{both('ttft_p95_ms', '.0f')} | {on['prompt_tokens_per_request']:.0f} | "
              f"{on['server_preprocess_ms_per_image']:.1f} / "
              f"{on['alone_preprocess_ms_per_image']:.1f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default="", help="comma-separated; default: all")
    parser.add_argument("--num-requests", type=int, default=12, help="per run")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--distinct-images", type=int, default=6)
    parser.add_argument("--image-sizes", default="640x480,320x320,1024x768")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny counts, for the test")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "families.json"))
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    known = builder_families()
    families = [f for f in args.families.split(",") if f] or known
    unknown = sorted(set(families) - set(known))
    if unknown:
        parser.error(f"unknown families {unknown}; the builder makes {known}")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.image_sizes.split(",")]
    started, total = time.perf_counter(), 4 * len(families)
    rows: list[dict] = []

    def progress(row: dict) -> None:
        print(f"[{len(rows)}/{total}] {row['family']}, {row['images_per_request']} image(s), "
              f"encoder cache {row['encoder_cache']}: {row['requests_per_s']:.2f} req/s, "
              f"{row['output_tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms "
              f"p95 {row['ttft_p95_ms']:.0f} ms, {row['failed']} failed "
              f"({time.perf_counter() - started:.0f} s in)", flush=True)  # fmt: skip

    report = {
        "workload": {k: v for k, v in vars(args).items() if k not in ("out", "families")},
        "families": families,
        "load_avg_1m_before": os.getloadavg()[0],
        "rows": rows,
        "skipped": {},
    }
    stopping: list[threading.Thread] = []
    try:
        for family in families:
            tmp = tempfile.mkdtemp(prefix=f"family-bench-{family}-")
            try:
                model_dir = build_family(family, os.path.join(tmp, family))
                images = takes_images(model_dir)
            except BaseException:
                shutil.rmtree(tmp)
                raise
            if not images:
                shutil.rmtree(tmp)
                report["skipped"][family] = "its frontend takes no images"
                total -= 4
                print(f"{family}: skipped, its frontend takes no images", flush=True)
                continue
            for row in bench_family(model_dir, tmp, args, sizes, stopping):
                rows.append(row)
                progress(row)
    finally:
        for thread in stopping:
            thread.join()
    report["load_avg_1m_after"] = os.getloadavg()[0]
    report["duration_s"] = time.perf_counter() - started
    print_table(rows)
    failed = sum(r["failed"] for r in rows)
    if failed:
        print(f"WARNING: {failed} requests failed: {[r['errors'] for r in rows if r['failed']]}")
    write_json(report, args.out)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
