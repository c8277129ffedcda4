"""Image serving benchmark: streamed chat requests with 1-3 images each, encoder cache on/off;
and vlmserve against vLLM's CPU build on one image per chat.

    .venv/bin/python bench/image_bench.py [--num-requests 48] [--distinct-images 12]
    .venv/bin/python bench/image_bench.py --peers vllm [--rounds 2]

With --peers (issue 10's image workload, also run by bench/serve_bench.py): a tiny LLaVA-1.5
with head_dim 32 (vLLM's CPU attention refuses the demo's 16), one fresh 640x480 random PNG per
chat (no cache hits across requests or rounds), 64 output tokens, EOS ignored, 4c requests at
concurrency c=16 (a round of 2c lasted ~2 s, too short to average out this machine's noise),
alternating rounds against each peer started here. vLLM is sent
"add_special_tokens": true, without which its LLaVA chat prompts lose their BOS.

On the Qwen2-VL-shaped demo checkpoint (`vlmserve demo-checkpoint --arch qwen2_vl`), each
request carries 1-3 seeded random images (sizes from --image-sizes) as base64 PNG data URLs,
drawn from a pool of --distinct-images, so images repeat across requests as they do when
users re-send a picture. The same workload runs against vlmserve with the workers' encoder
cache on, then off (--encoder-cache-mb 0). Also measured in this process: the frontend's
preprocessing time per image (decode + the model's image processor + placeholder expansion).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import os
import random
import tempfile
import time

import msgspec
import numpy as np
from peers import aggregate, alternate, print_table, start_servers, warm_up
from PIL import Image
from report import free_port, write_json
from safetensors.torch import load_file, save_file
from serve_client import Prompt, run_load, summarize
from vllm_peer import DEFAULT_VENV

from vlmserve.deploy.launcher import server
from vlmserve.frontend.media_fetch import decode_image
from vlmserve.frontend.prompts import Prompter
from vlmserve.frontend.schemas import ChatMessage
from vlmserve.shared.config import Config, new_run_id
from vlmserve.workers.demo_vlm import build_llava, build_vision_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def bench_checkpoint() -> str:
    path = os.path.join(HERE, ".cache", "qwen2-vl-demo")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        print(f"building the benchmark checkpoint in {path} ...", flush=True)
        build_vision_checkpoint(path, "qwen2_vl")
    return path


def image_pool(n: int, sizes: list[tuple[int, int]], seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        pool.append(buf.getvalue())
    return pool


def workload(n: int, pool: list[bytes], output_len: int, seed: int) -> list[list[int]]:
    """Which pool images each request shows (1 to 3)."""
    rng = random.Random(seed)
    return [[rng.randrange(len(pool)) for _ in range(rng.randint(1, 3))] for _ in range(n)]


def payloads(
    requests: list[list[int]], pool: list[bytes], output_len: int,
    model: str | None = "qwen2-vl-demo", system: str | None = None,
) -> list[dict]:  # fmt: skip
    """A streamed chat per request showing its pool images; with `system`, each opens with a
    system turn of its own (`system` and the request's index)."""
    urls = ["data:image/png;base64," + base64.b64encode(p).decode() for p in pool]
    bodies = []
    for i, images in enumerate(requests):
        user = {
            "role": "user",
            "content": [
                *[{"type": "image_url", "image_url": {"url": urls[j]}} for j in images],
                {"type": "text", "text": "Describe the pictures."},
            ],
        }
        turns = [{"role": "system", "content": f"{system}{i}."}] if system else []
        body = {
            "messages": [*turns, user], "max_tokens": output_len, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        bodies.append(body | ({"model": model} if model else {}))
    return bodies


def preprocessing_ms(model_dir: str, pool: list[bytes]) -> dict:
    """The frontend's work per image, as a request does it, in this process."""
    prompter = Prompter(model_dir, 4096)
    message = msgspec.convert(
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"},
                                      {"type": "text", "text": "Describe"}]}],
        list[ChatMessage],
    )  # fmt: skip
    times = []
    for data in pool:
        started = time.perf_counter()
        image = decode_image(data, 40_000_000)
        prompter.chat_inputs(message, [image])
        times.append((time.perf_counter() - started) * 1000)
    return {"mean_ms": float(np.mean(times)), "median_ms": float(np.median(times))}


def run_server(model_dir: str, cache_mb: int, bodies: list[dict], prompts: list[Prompt]) -> dict:
    label = f"encoder cache {'on' if cache_mb else 'off'}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            model=model_dir, run_id=new_run_id(), ipc_dir=tmp, server_name="127.0.0.1",
            server_port=free_port(), encoder_cache_mb=cache_mb, log_level="WARNING",
        )  # fmt: skip
        with server(config, os.path.join(tmp, "server.log")) as srv:
            print(f"{label}: warming up ...", flush=True)
            asyncio.run(run_load(srv["url"], bodies[:2], float("inf"), None, 0, lambda _: None))
            print(f"{label}: {len(bodies)} requests ...", flush=True)
            outcomes, wall = asyncio.run(
                run_load(srv["url"], bodies, float("inf"), 16, 0, lambda _: None)
            )
    return summarize(outcomes, wall, prompts)


def llava_checkpoint() -> str:
    """The demo LLaVA-1.5 with 2 heads of 32 (1 KV head) in its 64-wide language model, its
    weights under the published llava-hf names (vision_tower.vision_model.*): vLLM 0.32 refuses
    the names transformers 5 saves (vision_tower.embeddings.*); both load the published ones."""
    path = os.path.join(HERE, ".cache", "llava-hd32-v2")
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        print(f"building the LLaVA checkpoint in {path} ...", flush=True)
        build_llava(path, text=dict(num_attention_heads=2, num_key_value_heads=1))
        tensors = load_file(weights)
        prefix = "vision_tower."
        renamed = {
            ("vision_tower.vision_model." + k[len(prefix) :] if k.startswith(prefix) else k): v
            for k, v in tensors.items()
        }
        save_file(renamed, weights, metadata={"format": "pt"})
    return path


def one_image_chats(n: int, size: tuple[int, int], output_len: int, seed: int) -> list[dict]:
    urls = [
        "data:image/png;base64," + base64.b64encode(png).decode()
        for png in image_pool(n, [size], seed)
    ]
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "Describe the picture."},
                    ],
                }
            ],
            "max_tokens": output_len,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
        for url in urls
    ]


def peer_comparison(
    peers: list[str], rounds: int = 2, concurrency: int = 16, output_len: int = 64,
    size: tuple[int, int] = (640, 480), venv: str = DEFAULT_VENV, threads: str | None = None,
    seed: int = 0,
) -> dict:  # fmt: skip
    """vlmserve and each peer on the LLaVA checkpoint, alternating rounds of 4c chats."""
    model_dir = llava_checkpoint()
    n = 4 * concurrency
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        names = ["vlmserve", *peers]
        urls, failures = start_servers(stack, names, model_dir, tmp, 64, venv, threads)
        warm = one_image_chats(2, size, 8, seed + 999_999)
        warm_up(urls, warm, [Prompt("", [], 8)] * 2)

        def workload(r: int) -> tuple[list[dict], list[Prompt]]:
            bodies = one_image_chats(n, size, output_len, seed + 1000 * concurrency + r)
            return bodies, [Prompt("", [], output_len) for _ in bodies]

        extra = {"vllm": {"add_special_tokens": True}}
        per_round = alternate(urls, rounds, concurrency, workload, extra, f"images c={concurrency}")
    return {
        "workload": {
            "model": model_dir, "image": f"{size[0]}x{size[1]} random PNG, one per chat, fresh",
            "requests_per_round": n, "concurrency": concurrency, "output_len": output_len,
            "rounds": rounds,
        },
        "per_round": per_round,
        "summary": {concurrency: aggregate(per_round)},
        "peer_failures": failures,
    }  # fmt: skip


def print_peer_report(report: dict) -> None:
    w = report["workload"]
    print_table(
        f"images: tiny LLaVA (head_dim 32), {w['image']}, {w['output_len']} output tokens",
        report["summary"],
    )
    for name, why in report["peer_failures"].items():
        print(f"{name}: no figures, it failed to start: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--distinct-images", type=int, default=12)
    parser.add_argument("--image-sizes", default="640x480,320x320,1024x768")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", default="", help="vllm[,transformers]: the LLaVA comparison")
    parser.add_argument("--rounds", type=int, default=2, help="with --peers")
    parser.add_argument("--vllm-venv", default=DEFAULT_VENV)
    parser.add_argument("--out", default=None, help="default results/images[_peers].json")
    args = parser.parse_args()
    if args.peers:
        peers = [p for p in args.peers.split(",") if p]
        report = peer_comparison(peers, args.rounds, venv=args.vllm_venv, seed=args.seed)
        print_peer_report(report)
        write_json(report, args.out or os.path.join(HERE, "results", "images_peers.json"))
        return
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.image_sizes.split(",")]
    model_dir = bench_checkpoint()
    pool = image_pool(args.distinct_images, sizes, args.seed)
    requests = workload(args.num_requests, pool, args.output_len, args.seed)
    bodies = payloads(requests, pool, args.output_len)
    prompts = [Prompt("", [], args.output_len) for _ in requests]
    print("frontend preprocessing ...", flush=True)
    report = {
        "workload": {
            "requests": args.num_requests,
            "images": sum(map(len, requests)),
            "distinct_images": args.distinct_images,
            "sizes": args.image_sizes,
            "output_len": args.output_len,
            "max_concurrency": 16,
        },  # fmt: skip
        "preprocessing_per_image": preprocessing_ms(model_dir, pool),
        "cache_on": run_server(model_dir, 1024, bodies, prompts),
        "cache_off": run_server(model_dir, 0, bodies, prompts),
    }
    images = report["workload"]["images"]
    print(f"\n| {'':28} | {'cache on':>10} | {'cache off':>10} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|")
    for label, key, scale in [
        ("image requests/s", "request_throughput", 1), ("TTFT mean (ms)", "mean_ttft_ms", 1),
        ("TTFT median (ms)", "median_ttft_ms", 1), ("TTFT p99 (ms)", "p99_ttft_ms", 1),
    ]:  # fmt: skip
        on, off = report["cache_on"][key] * scale, report["cache_off"][key] * scale
        print(f"| {label:28} | {on:10.1f} | {off:10.1f} |")
    pre = report["preprocessing_per_image"]
    print(f"\n{images} images in {args.num_requests} requests; frontend preprocessing "
          f"{pre['mean_ms']:.1f} ms per image (median {pre['median_ms']:.1f})")  # fmt: skip
    failed = report["cache_on"]["failed"] + report["cache_off"]["failed"]
    if failed:
        print(f"WARNING: {failed} requests failed: {report['cache_on']['errors']}")
    write_json(report, args.out or os.path.join(HERE, "results", "images.json"))


if __name__ == "__main__":
    main()
