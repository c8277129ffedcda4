"""Numpy arrays as raw ZeroMQ frames: metadata in the message, bytes beside it."""

from __future__ import annotations

import numpy as np

from vlmserve.shared.messages import ArrayMeta


def to_frames(arrays: dict[str, np.ndarray]) -> tuple[list[ArrayMeta], list[memoryview]]:
    metas, frames = [], []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        metas.append(ArrayMeta(name, array.dtype.str, list(array.shape)))
        frames.append(memoryview(array).cast("B"))
    return metas, frames


def from_frames(metas: list[ArrayMeta], frames: list) -> dict[str, np.ndarray]:
    """Arrays viewing the frames' buffers (no copy); `frames` holds one per meta."""
    if len(frames) != len(metas):
        raise ValueError(f"expected {len(metas)} array frames, got {len(frames)}")
    return {
        meta.name: np.frombuffer(frame, dtype=np.dtype(meta.dtype)).reshape(meta.shape)
        for meta, frame in zip(metas, frames, strict=True)
    }
