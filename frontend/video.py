"""A request's videos: fetched under the rules images are (media_fetch.load_bytes: the SSRF
guard, data: URLs, local files under --allowed-local-media-path) with their own byte cap
(--video-max-bytes), decoded with PyAV off the event loop, and sampled.

Sampling follows the model's video processor: Qwen2-VL's (`fps` frames a second of video, at
most `max_frames`, a multiple of the model's temporal patch, evenly stepped) or Qwen3-VL's
(`linspace`: the same count without the rounding, spread from the first frame to the last), and
only the sampled frames are converted to RGB, so a long clip costs its compressed bytes, not its
decoded ones. Every failure is the client's: a 400 with param "messages" naming the problem (not
a video, no video stream, corrupt, too long, too large, frames too big), never a 500 and never a
worker crash.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np

from vlmserve.frontend.errors import APIError, bad_request
from vlmserve.frontend.media_fetch import load_bytes
from vlmserve.frontend.schemas import VideoURL
from vlmserve.shared.config import Config

PARAM = "messages"
VIDEO_CODE = "invalid_video"
MIN_FRAMES = 4  # Qwen2VLVideoProcessor's min_frames: short or slow samplings take at least 4


@dataclass
class Video:
    """The sampled frames of one video and what the model needs to place them in time."""

    frames: np.ndarray  # [frames, height, width, 3] uint8 RGB
    fps: float  # frames per second of the sampled frames (transformers' `sampled_fps`)
    hash: str  # of the frames and their rate: the encoder and prefix caches' key
    # Where the frames are in the video (transformers' VideoMetadata.frames_indices and fps):
    # Qwen3-VL writes each temporal patch's time in the prompt.
    indices: list[int]
    native_fps: float


@dataclass(frozen=True)
class Sampling:
    fps: float
    max_frames: int
    multiple: int  # the frame count is a multiple of this (the model's temporal patch)
    max_seconds: float
    max_pixels: int  # per frame
    linspace: bool = False  # Qwen3VLVideoProcessor's rule (see sample_indices)


def _video_error(message: str) -> APIError:
    return bad_request(message, PARAM, VIDEO_CODE)


def sampling_of(
    part: VideoURL | str, config: Config, multiple: int, linspace: bool = False
) -> Sampling:
    """The request's sampling within the server's caps; 400 when it asks past them."""
    fps = config.video_fps if isinstance(part, str) or part.fps is None else part.fps
    max_frames = config.video_max_frames
    if not isinstance(part, str) and part.max_frames is not None:
        if part.max_frames > config.video_max_frames:
            raise _video_error(
                f"A video part asks for max_frames {part.max_frames}; this server samples at "
                f"most {config.video_max_frames} frames a video (--video-max-frames)."
            )
        max_frames = part.max_frames
    return Sampling(
        fps, max_frames, multiple, config.video_max_seconds, config.image_max_pixels, linspace
    )


def sample_indices(total: int, native_fps: float, sampling: Sampling) -> list[int]:
    """Which of `total` frames (at `native_fps`) are sampled: `sampling.fps` a second but at
    least MIN_FRAMES, at most `max_frames`, rounded down to a multiple of `multiple` but never
    fewer than one multiple (a clip shorter than that keeps all its frames; the processor
    repeats the last).

    With `sampling.linspace` (Qwen3VLVideoProcessor.sample_frames): int(seconds * fps) frames,
    at least MIN_FRAMES, at most `max_frames` and `total`, not rounded to the temporal patch
    (the processor repeats the last frame), at the rounded points of an even spread from the
    first frame to the last."""
    if sampling.linspace:
        n = min(max(int(total / native_fps * sampling.fps), MIN_FRAMES), sampling.max_frames, total)
        return np.linspace(0, total - 1, n).round().astype(int).tolist()
    m = sampling.multiple
    wanted = total / native_fps * sampling.fps
    n = min(max(wanted, MIN_FRAMES), sampling.max_frames, total)
    n = max(m, math.floor(n / m) * m)
    n = min(n, total)
    return [int(i * total / n) for i in range(n)]


def decode_video(data: bytes, sampling: Sampling) -> Video:
    """The sampled frames of the video in `data`. Blocking: run it off the loop."""
    import av

    try:
        total, native_fps = _probe(data, sampling)
        indices = sample_indices(total, native_fps, sampling)
        frames = _decode_frames(data, indices)
    except APIError:
        raise
    except Exception as exc:  # untrusted bytes: any demuxer or decoder failure is the input's
        if isinstance(exc, av.error.InvalidDataError) or "Invalid data" in str(exc):
            raise _video_error(
                "The video data is not a video in a format this server reads "
                "(MP4, WebM, MKV, AVI, ...)."
            ) from None
        raise _video_error(
            f"The video could not be decoded (truncated or corrupt): {exc}"
        ) from None
    if len(frames) < len(indices):
        raise _video_error(
            f"The video could not be decoded (truncated or corrupt): {len(frames)} of the "
            f"{total} frames its container declares could be read."
        )
    stack = np.stack(frames)  # [frames, height, width, 3]
    fps = len(indices) / total * native_fps
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"video:{stack.shape}:{fps!r}:".encode())
    digest.update(stack.tobytes())
    return Video(stack, fps, digest.hexdigest(), indices, native_fps)


def _probe(data: bytes, sampling: Sampling) -> tuple[int, float]:
    """The video stream's frame count and rate, refusing what is too long or too large
    before any frame is decoded."""
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise _video_error("The video has no video stream.")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > sampling.max_pixels:
            raise _video_error(
                f"The video's frames are {width}x{height} pixels, over this server's limit of "
                f"{sampling.max_pixels:,} pixels a frame (--image-max-pixels)."
            )
        rate = stream.average_rate or stream.guessed_rate
        native_fps = float(rate) if rate else 0.0
        if not native_fps > 0:
            raise _video_error("The video declares no frame rate.")
        seconds = None
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / av.time_base
        if seconds is not None:
            _check_seconds(seconds, sampling)
        total = stream.frames
        if not total:  # containers that do not count (WebM): count the packets
            total = sum(1 for packet in container.demux(stream) if packet.size)
        if total < 1:
            raise _video_error("The video has no frames.")
        _check_seconds(total / native_fps, sampling)
        return total, native_fps


def _check_seconds(seconds: float, sampling: Sampling) -> None:
    if seconds > sampling.max_seconds:
        raise _video_error(
            f"The video is {seconds:.1f} s long, over this server's limit of "
            f"{sampling.max_seconds:g} s (--video-max-seconds)."
        )


def _decode_frames(data: bytes, indices: list[int]) -> list[np.ndarray]:
    """The frames at `indices` (ascending), as [height, width, 3] RGB arrays."""
    import av

    wanted, frames, shape = set(indices), [], None
    with av.open(io.BytesIO(data)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                if shape is not None and rgb.shape != shape:
                    raise _video_error(
                        "The video's frames change size mid-stream "
                        f"({shape[1]}x{shape[0]}, then {rgb.shape[1]}x{rgb.shape[0]})."
                    )
                shape = rgb.shape
                frames.append(rgb)
            if i >= indices[-1]:
                break
    return frames


async def load_video(
    part: VideoURL | str,
    config: Config,
    client: httpx.AsyncClient,
    multiple: int,
    linspace: bool = False,
) -> Video:
    """The video of one content part, fetched, decoded and sampled."""
    sampling = sampling_of(part, config, multiple, linspace)
    url = part if isinstance(part, str) else part.url
    data = await load_bytes(url, config, client, config.video_max_bytes, "video")
    return await asyncio.get_running_loop().run_in_executor(None, decode_video, data, sampling)


async def load_videos(
    parts: Sequence[VideoURL | str],
    config: Config,
    client: httpx.AsyncClient,
    multiple: int,
    linspace: bool = False,
) -> list[Video]:
    """All videos of one request, concurrently, in order; the first failure is raised. 400
    first when there are more than --limit-mm-per-prompt. `multiple` and `linspace`: the
    model's sampling rule (sample_indices)."""
    if len(parts) > config.limit_mm_per_prompt:
        raise bad_request(
            f"Too many videos: the request has {len(parts)}; this server accepts at most "
            f"{config.limit_mm_per_prompt} per request (--limit-mm-per-prompt).",
            PARAM,
            "too_many_videos",
        )
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(load_video(p, config, client, multiple, linspace)) for p in parts
            ]
    except ExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]
