"""Video serving benchmark: streamed chat requests with one video of 8 or 32 sampled frames.

    .venv/bin/python bench/video_bench.py [--num-requests 16] [--concurrency 4]

On the Qwen2-VL-shaped demo checkpoint, each request carries its own
seeded clip (moving shapes over noise, H.264 in MP4, --size pixels, 8 fps) as a base64 data
URL with `fps` 8, so every frame is sampled and no request hits the encoder or prefix cache
of another. For each frame count: requests/s and TTFT through the server (--video-max-frames
32), and, in this process, the frontend's work per video (PyAV decode and sampling, then the
model's preprocessing and placeholder expansion). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import tempfile
import time

import av
import msgspec
import numpy as np
from report import free_port, write_json
from serve_client import Prompt, run_load, summarize

from vlmserve.deploy.launcher import server
from vlmserve.frontend.prompts import Prompter
from vlmserve.frontend.schemas import ChatMessage
from vlmserve.frontend.video import Sampling, decode_video
from vlmserve.shared.config import Config, new_run_id
from vlmserve.workers.demo_vlm import build_vision_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
FPS = 8


def bench_checkpoint() -> str:
    """The Qwen2-VL demo (built once; its own folder, so its chat template writes videos)."""
    path = os.path.join(HERE, ".cache", "qwen2-vl-demo-video")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        print(f"building the benchmark checkpoint in {path} ...", flush=True)
        build_vision_checkpoint(path, "qwen2_vl")
    return path


def make_clip(frames: int, size: tuple[int, int], seed: int) -> bytes:
    width, height = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = base.copy()
            x = (8 * i) % (width - 32)
            img[20:52, x : x + 32] = (230, 20, 20)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def payload(clip: bytes, output_len: int) -> dict:
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    return {
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url, "fps": FPS}},
            {"type": "text", "text": "What happens in the video?"}]}],
        "max_tokens": output_len, "temperature": 0, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip


def frontend_ms(model_dir: str, clips: list[bytes], frames: int) -> dict:
    """Decode + sampling, and preprocessing + expansion, per video, in this process."""
    prompter = Prompter(model_dir, 32768)
    message = msgspec.convert(
        [{"role": "user", "content": [{"type": "video_url", "video_url": "x"},
                                      {"type": "text", "text": "What happens?"}]}],
        list[ChatMessage],
    )  # fmt: skip
    sampling = Sampling(FPS, frames, 2, 600.0, 40_000_000)
    decode, process, tokens = [], [], 0
    for clip in clips:
        started = time.perf_counter()
        video = decode_video(clip, sampling)
        decoded = time.perf_counter()
        ids, _ = prompter.chat_inputs(message, [], None, [video])
        process.append((time.perf_counter() - decoded) * 1000)
        decode.append((decoded - started) * 1000)
        tokens = len(ids)
    return {
        "decode_ms": float(np.median(decode)),
        "preprocess_ms": float(np.median(process)),
        "prompt_tokens": tokens,
    }


def run_server(model_dir: str, bodies: list[dict], output_len: int, concurrency: int) -> dict:
    prompts = [Prompt("", [], output_len) for _ in bodies]
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            model=model_dir, run_id=new_run_id(), ipc_dir=tmp, server_name="127.0.0.1",
            server_port=free_port(), log_level="WARNING", video_max_frames=32,
            max_body_mb=64,
        )  # fmt: skip
        with server(config, os.path.join(tmp, "server.log")) as srv:
            asyncio.run(run_load(srv["url"], bodies[:1], float("inf"), None, 0, lambda _: None))
            outcomes, wall = asyncio.run(
                run_load(srv["url"], bodies[1:], float("inf"), concurrency, 0, lambda _: None)
            )
    return summarize(outcomes, wall, prompts[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--frames", default="8,32")
    parser.add_argument("--size", default="224x224")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "video.json"))
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    model_dir = bench_checkpoint()
    report: dict = {"workload": vars(args) | {"fps": FPS}, "runs": {}}
    for frames in [int(f) for f in args.frames.split(",")]:
        clips = [make_clip(frames, size, seed) for seed in range(args.num_requests + 1)]
        print(f"{frames} frames: frontend ...", flush=True)
        front = frontend_ms(model_dir, clips[:4], frames)
        print(f"{frames} frames: {args.num_requests} requests ...", flush=True)
        bodies = [payload(clip, args.output_len) for clip in clips]
        served = run_server(model_dir, bodies, args.output_len, args.concurrency)
        report["runs"][str(frames)] = {"frontend": front, "server": served}
    print("\n| frames | prompt tokens | decode ms | preprocess ms | req/s | TTFT median ms |")
    print("|---|---|---|---|---|---|")
    for frames, run in report["runs"].items():
        f, s = run["frontend"], run["server"]
        print(f"| {frames} | {f['prompt_tokens']} | {f['decode_ms']:.1f} | "
              f"{f['preprocess_ms']:.1f} | {s['request_throughput']:.2f} | "
              f"{s['median_ttft_ms']:.0f} |")  # fmt: skip
        if s["failed"]:
            print(f"WARNING: {s['failed']} requests failed: {s['errors']}")
    write_json(report, args.out)


if __name__ == "__main__":
    main()
