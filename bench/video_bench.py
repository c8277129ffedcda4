"""Video serving benchmark: streamed chat requests with one video of 8 or 32 sampled frames.

    .venv/bin/python bench/video_bench.py [--num-requests 16] [--concurrency 4] [--families ...]

On each demo checkpoint that takes videos (default: every vision family of `vlmserve
demo-checkpoint` as bench/family_bench.py finds them, whose frontend accepts video parts; the
others are listed as skipped), built fresh and served once, each request carries its own
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
from collections.abc import Callable

import av
import msgspec
import numpy as np
from family_bench import build_family, builder_families
from report import free_port, write_json
from serve_client import Prompt, run_load, summarize

from vlmserve.deploy.launcher import server
from vlmserve.frontend.prompts import Prompter
from vlmserve.frontend.schemas import ChatMessage
from vlmserve.frontend.video import Sampling, decode_video
from vlmserve.shared.config import Config, new_run_id

HERE = os.path.dirname(os.path.abspath(__file__))
FPS = 8


def takes_videos(model_dir: str) -> bool:
    """What the frontend asks before it takes a video part (frontend/routes/chat.py)."""
    return getattr(Prompter(model_dir, 32768).images, "video_frame_multiple", None) is not None


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


def serve_family(
    model_dir: str, clips: dict[int, list[bytes]], output_len: int, concurrency: int,
    progress: Callable[[str], None],
) -> dict:  # fmt: skip
    """One server for every frame count (the first clip of each is its warm-up)."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            model=model_dir, run_id=new_run_id(), ipc_dir=tmp, server_name="127.0.0.1",
            server_port=free_port(), log_level="WARNING", video_max_frames=max(clips),
            max_body_mb=64,
        )  # fmt: skip
        with server(config, os.path.join(tmp, "server.log")) as srv:
            for frames, batch in clips.items():
                bodies = [payload(clip, output_len) for clip in batch]
                prompts = [Prompt("", [], output_len) for _ in bodies[1:]]
                asyncio.run(run_load(srv["url"], bodies[:1], float("inf"), None, 0, lambda _: 0))
                progress(f"{frames} frames: {len(bodies) - 1} requests ...")
                outcomes, wall = asyncio.run(
                    run_load(srv["url"], bodies[1:], float("inf"), concurrency, 0, lambda _: 0)
                )
                runs[frames] = summarize(outcomes, wall, prompts)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default="", help="comma-separated; default: all")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--frames", default="8,32")
    parser.add_argument("--size", default="224x224")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "video.json"))
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    known = builder_families()
    families = [f for f in args.families.split(",") if f] or known
    if set(families) - set(known):
        parser.error(f"unknown families {sorted(set(families) - set(known))}; choose from {known}")
    frame_counts = [int(f) for f in args.frames.split(",")]
    clips = {n: [make_clip(n, size, 1000 * n + i) for i in range(args.num_requests + 1)]
             for n in frame_counts}  # fmt: skip
    report: dict = {"workload": vars(args) | {"fps": FPS}, "runs": {}, "skipped": {}}
    for family in families:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = build_family(family, os.path.join(tmp, family))
            if not takes_videos(model_dir):
                report["skipped"][family] = "its frontend takes no videos"
                print(f"{family}: skipped, its frontend takes no videos", flush=True)
                continue
            print(f"{family}: frontend ...", flush=True)
            front = {n: frontend_ms(model_dir, clips[n][:4], n) for n in frame_counts}
            served = serve_family(
                model_dir, clips, args.output_len, args.concurrency,
                lambda line: print(f"{family}: {line}", flush=True),  # noqa: B023
            )  # fmt: skip
        report["runs"][family] = {
            str(n): {"frontend": front[n], "server": served[n]} for n in frame_counts
        }
    print("\n| family | frames | prompt tokens | decode ms | preprocess ms | req/s | "
          "TTFT median ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for family, runs in report["runs"].items():
        for frames, run in runs.items():
            f, s = run["frontend"], run["server"]
            print(f"| {family} | {frames} | {f['prompt_tokens']} | {f['decode_ms']:.1f} | "
                  f"{f['preprocess_ms']:.1f} | {s['request_throughput']:.2f} | "
                  f"{s['median_ttft_ms']:.0f} |")  # fmt: skip
            if s["failed"]:
                print(f"WARNING: {family}, {frames} frames: {s['failed']} requests failed: "
                      f"{s['errors']}")  # fmt: skip
    if report["skipped"]:
        print(f"skipped (no video): {', '.join(report['skipped'])}")
    write_json(report, args.out)


if __name__ == "__main__":
    main()
