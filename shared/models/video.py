"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL video preprocessing without torchvision.

transformers' Qwen2VLVideoProcessor resizes with torchvision, which has no build for our torch.
The same result comes from the checkpoint's (PIL) image processor run on each frame, sized by
the video processor's settings, then the frames grouped in time: the image processor writes
each frame's patches with the frame repeated over the temporal patch, and a video's patch holds
`temporal_patch_size` consecutive frames instead (the last frame repeated to fill the last
group), in the same (row block, column block, row, column, channel, time, y, x) order.

Frames whose size already fits the processor's sizing (a multiple of patch * merge, within
its pixel bounds) come out exactly as transformers' video processor gives them; others are
resized by PIL's bicubic, where torchvision's differs in the last bits.

Qwen3-VL's video processor sizes a video as a whole (`video_frame_size`): its pixel bounds hold
frames x height x width, so the frame size depends on how many frames were sampled.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from vlmserve.shared.models.spec import read_json

# Qwen2VLVideoProcessor's own size when a checkpoint's configs set none.
DEFAULT_VIDEO_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}


def video_config(model_dir: str) -> dict:
    """video_preprocessor_config.json, or (as transformers falls back to)
    preprocessor_config.json."""
    return read_json(os.path.join(model_dir, "video_preprocessor_config.json")) or read_json(
        os.path.join(model_dir, "preprocessor_config.json")
    )


def video_size(model_dir: str, default: dict[str, int] = DEFAULT_VIDEO_SIZE) -> dict[str, int]:
    """The pixel bounds frames are sized to: video_config's, else the video processor's own
    (`default`)."""
    config = video_config(model_dir)
    size = dict(config.get("size") or {})
    if "min_pixels" in config:
        size["shortest_edge"] = config["min_pixels"]
    if "max_pixels" in config:
        size["longest_edge"] = config["max_pixels"]
    if not size.get("shortest_edge") or not size.get("longest_edge"):
        return dict(default)
    return {"shortest_edge": int(size["shortest_edge"]), "longest_edge": int(size["longest_edge"])}


def video_frame_size(
    frames: int, height: int, width: int, size: dict[str, int], factor: int, temporal: int
) -> tuple[int, int]:
    """(height, width) Qwen3VLVideoProcessor resizes the frames of a video to: each side a
    multiple of `factor` (patch * merge), frames (to a multiple of `temporal`) x height x width
    within `size`'s shortest_edge..longest_edge pixels, scaled down (floor) or up (ceil) with the
    aspect ratio kept when outside them."""
    if frames < temporal:
        raise ValueError(f"a video needs at least {temporal} frames, this one has {frames}")
    if height < factor or width < factor:  # too small a side: scaled up to `factor` first
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"the video's aspect ratio {width}x{height} is over 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / temporal) * temporal
    if t * h * w > size["longest_edge"]:
        beta = math.sqrt(frames * height * width / size["longest_edge"])
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < size["shortest_edge"]:
        beta = math.sqrt(size["shortest_edge"] / (frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def video_patches(
    image_processor: Any,
    frames: np.ndarray,
    size: dict[str, int],
    frame_size: tuple[int, int] | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """`pixel_values_videos` [t * h * w, channels * temporal * patch * patch] and
    `video_grid_thw` [1, 3] of one video's frames [frames, height, width, 3] (uint8 RGB), each
    frame sized within `size` or, given `frame_size` (height, width), to exactly that; `kwargs`
    go to the image processor (the video processor's image_mean / image_std)."""
    if frame_size is not None:
        height, width = frame_size
        if frames.shape[1:3] != (height, width):
            from PIL import Image

            frames = np.stack(
                [
                    np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
                    for f in frames
                ]
            )
        size = {"shortest_edge": height * width, "longest_edge": height * width}
    p = image_processor.patch_size
    m = image_processor.merge_size
    tp = image_processor.temporal_patch_size
    out = image_processor(images=list(frames), size=size, return_tensors="np", **kwargs)
    grids = out["image_grid_thw"]  # [frames, 3], each (1, h, w)
    _, h, w = (int(x) for x in grids[0])
    n = len(frames)
    # Each frame's patches, its copies over the temporal patch dropped.
    per_frame = out["pixel_values"].reshape(n, h // m, w // m, m, m, 3, tp, p, p)[..., 0, :, :]
    if pad := -n % tp:
        per_frame = np.concatenate([per_frame, np.repeat(per_frame[-1:], pad, axis=0)])
    t = per_frame.shape[0] // tp
    grouped = per_frame.reshape(t, tp, h // m, w // m, m, m, 3, p, p)
    patches = grouped.transpose(0, 2, 3, 4, 5, 6, 1, 7, 8).reshape(t * h * w, 3 * tp * p * p)
    return np.ascontiguousarray(patches), np.array([[t, h, w]], dtype=np.int64)
