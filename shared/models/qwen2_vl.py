"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, `<|image_pad|>` expanded to one token per
merged 2x2 patch, multimodal RoPE (computed by the compute side).

Their AutoProcessor needs torchvision (for video), which has no build for our torch, so the
image processor runs alone and the placeholder expansion is done here, as their processor does;
videos (`<|video_pad|>`) go through shared/models/video.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlmserve.shared.models.processing import placeholder_runs, tokenize_rendered
from vlmserve.shared.models.spec import ImageProcessor, ModelSpec, PlacedImage
from vlmserve.shared.models.video import video_patches, video_size


@dataclass(frozen=True)
class PixelBounds:
    """One request's pixel bounds (vLLM's `mm_processor_kwargs` min_pixels / max_pixels, as
    transformers' Qwen2-VL processor takes them at call time: each replaces its end of the
    processor's `size`, shortest_edge / longest_edge), under the server's ceiling `cap`
    (--mm-max-pixels; 0: none), which also lowers a checkpoint's larger longest_edge."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    cap: int = 0

    def size(self, default: dict[str, int]) -> dict[str, int]:
        """`default` (shortest_edge / longest_edge in pixels) with this request's bounds."""
        longest = self.max_pixels or default["longest_edge"]
        if self.cap:
            longest = min(longest, self.cap)
        return {
            "shortest_edge": self.min_pixels or default["shortest_edge"],
            "longest_edge": longest,
        }


class QwenVLImages:
    def __init__(self, model_dir: str, hf_config: Any) -> None:
        import transformers

        self.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.image_token_id = hf_config.image_token_id
        self.pad = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        # Videos (shared/models/video.py): frames are sampled in multiples of the temporal patch.
        self.video_token_id = hf_config.video_token_id
        self.video_pad = self.tokenizer.convert_ids_to_tokens(self.video_token_id)
        self.video_frame_multiple = int(self.image_processor.temporal_patch_size)
        self.video_size = video_size(model_dir)
        self.merge_tokens = self.image_processor.merge_size**2
        ip_size = self.image_processor.size
        self.image_size = {
            "shortest_edge": ip_size.shortest_edge,
            "longest_edge": ip_size.longest_edge,
        }
        # Each side of a resized image is a multiple of this (smart_resize's factor).
        self.factor = self.image_processor.patch_size * self.image_processor.merge_size

    def process(
        self,
        text: str,
        images: list,
        videos: Sequence[Any] = (),
        pixels: PixelBounds | None = None,
    ) -> tuple[list[int], list[PlacedImage]]:
        """As ImageProcessor.process; `videos` have `frames` [n, height, width, 3] (uint8
        RGB) and `fps` (of the sampled frames) and are placed at the `<|video_pad|>`s;
        `pixels`: the request's bounds (None: the checkpoint's)."""
        import numpy as np

        merge = self.merge_tokens
        items: list[dict[str, Any]] = []
        if images:
            sized = {} if pixels is None else {"size": pixels.size(self.image_size)}
            out = self.image_processor(images=images, return_tensors="np", **sized)
            bounds = np.cumsum([0, *[int(np.prod(g)) for g in out["image_grid_thw"]]])
            items += [
                {
                    "pixel_values": out["pixel_values"][bounds[i] : bounds[i + 1]],
                    "image_grid_thw": out["image_grid_thw"][i : i + 1],
                }
                for i in range(len(images))
            ]
        for video in videos:
            items.append(self.video_arrays(video, pixels))
        image_items, video_items = items[: len(images)], items[len(images) :]
        pads = {self.pad: image_items, self.video_pad: video_items}
        pieces = re.split(f"({re.escape(self.pad)}|{re.escape(self.video_pad)})", text)
        for pad, found in pads.items():
            if pieces.count(pad) != len(found):
                kind = "image" if pad == self.pad else "video"
                raise ValueError(
                    f"{pieces.count(pad)} {kind} placeholders for {len(found)} {kind}s"
                )
        cursor = {self.pad: iter(image_items), self.video_pad: iter(video_items)}
        clips = iter(videos)
        ordered, expanded, run_counts = [], [], []
        for piece in pieces:
            if piece == self.pad:
                item = next(cursor[piece])
                piece = piece * (int(np.prod(item["image_grid_thw"])) // merge)
                run_counts.append(1)
                ordered.append(item)
            elif piece == self.video_pad:
                item = next(cursor[piece])
                piece = self.video_text(item, next(clips))
                run_counts.append(len(re.findall(f"(?:{re.escape(self.video_pad)})+", piece)))
                ordered.append(item)
            expanded.append(piece)
        ids = tokenize_rendered(self.tokenizer, "".join(expanded))
        runs = sorted(
            placeholder_runs(ids, self.image_token_id) + placeholder_runs(ids, self.video_token_id)
        )
        if len(runs) != sum(run_counts):  # placeholders written next to each other merge
            raise ValueError(f"{len(runs)} placeholder runs for {len(ordered)} images and videos")
        # An item's span runs from its first placeholder to its last (Qwen3-VL's videos hold
        # a timestamp between temporal patches).
        placed, bounds = [], np.cumsum([0, *run_counts])
        for i, arrays in enumerate(ordered):
            first, last = runs[bounds[i]], runs[bounds[i + 1] - 1]
            placed.append(PlacedImage(first[0], last[0] + last[1] - first[0], arrays))
        return ids, placed

    def video_arrays(self, video: Any, pixels: PixelBounds | None = None) -> dict[str, Any]:
        """A video's arrays for the workers: its patches, grid and time per temporal patch;
        each frame sized within the video processor's bounds or the request's `pixels`."""
        import numpy as np

        size = self.video_size if pixels is None else pixels.size(self.video_size)
        patches, grid = video_patches(self.image_processor, video.frames, size)
        seconds = self.video_frame_multiple / video.fps  # of video per temporal patch
        return {
            "pixel_values_videos": patches,
            "video_grid_thw": grid,
            "second_per_grid_ts": np.array([seconds], dtype=np.float32),
        }

    def video_text(self, arrays: dict[str, Any], video: Any) -> str:
        """What a video's `<|video_pad|>` becomes: one per merged patch of every frame."""
        return self.video_pad * (int(arrays["video_grid_thw"].prod()) // self.merge_tokens)


class Qwen2VLSpec(ModelSpec):
    family = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)

    def image_processor(self, model_dir: str) -> ImageProcessor:
        return QwenVLImages(model_dir, self.hf_config(model_dir))


class Qwen25VLSpec(Qwen2VLSpec):
    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)


SPECS = [Qwen2VLSpec(), Qwen25VLSpec()]
