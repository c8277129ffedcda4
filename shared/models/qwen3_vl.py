"""Qwen3-VL: Qwen2-VL's image side (one `<|image_pad|>` per merged 2x2 patch between
`<|vision_start|>` and `<|vision_end|>`), sized by the image processor's `size`
(`shortest_edge` / `longest_edge` in pixels) with 16-pixel patches; interleaved multimodal RoPE
and DeepStack are the compute side's. Qwen3-VL-MoE has the same input side.

Videos as Qwen3VLProcessor writes them: frames sampled by Qwen3VLVideoProcessor's rule (an even
spread, frontend/video.py), sized as a whole (shared/models/video.py's video_frame_size), and
each temporal patch written as `<{seconds:.1f} seconds><|vision_start|><|video_pad|>...
<|vision_end|>`, the seconds being the mean time of its first and last frame in the video. A
video's span runs from its first `<|video_pad|>` to its last, timestamps inside it.
"""

from __future__ import annotations

from typing import Any

from vlmserve.shared.models.qwen2_vl import Qwen2VLSpec, QwenVLImages
from vlmserve.shared.models.spec import ImageProcessor
from vlmserve.shared.models.video import video_config, video_frame_size, video_patches, video_size

# Qwen3VLVideoProcessor's own settings where a checkpoint's configs set none.
VIDEO_SIZE = {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32}
MAX_VIDEO_TOKENS = 768  # per frame, under cap_pixels_per_frame


class Qwen3VLImages(QwenVLImages):
    video_linspace = True  # frontend/video.py samples with Qwen3VLVideoProcessor's rule

    def __init__(self, model_dir: str, hf_config: Any) -> None:
        super().__init__(model_dir, hf_config)
        config = video_config(model_dir)
        self.video_size = video_size(model_dir, VIDEO_SIZE)
        ip = self.image_processor
        for key in ("patch_size", "merge_size", "temporal_patch_size"):
            if key in config and config[key] != getattr(ip, key):
                raise ValueError(
                    f"the video processor's {key} {config[key]} differs from the image "
                    f"processor's {getattr(ip, key)}; videos are patched by the latter"
                )
        self.cap_pixels = bool(config.get("cap_pixels_per_frame"))
        self.max_video_tokens = int(config.get("max_video_tokens", MAX_VIDEO_TOKENS))
        self.normalize = {k: config[k] for k in ("image_mean", "image_std") if k in config}
        self.vision_start = self.tokenizer.convert_ids_to_tokens(hf_config.vision_start_token_id)
        self.vision_end = self.tokenizer.convert_ids_to_tokens(hf_config.vision_end_token_id)

    def video_arrays(self, video: Any, pixels: Any = None) -> dict[str, Any]:
        """Patches and grid of the frames at Qwen3VLVideoProcessor's size (no time per patch:
        Qwen3-VL places videos in time by the timestamps in the prompt). A request's `pixels`
        do not apply: Qwen3VLVideoProcessor takes no min_pixels / max_pixels (transformers'
        processor gives them to the image processor alone)."""
        n, height, width = video.frames.shape[:3]
        size = dict(self.video_size)
        if self.cap_pixels:  # the per-frame cap of qwen-vl-utils, when the config asks for it
            per_frame = max(
                min(self.max_video_tokens * self.factor**2, size["longest_edge"] // n),
                int(size["shortest_edge"] * 1.05),
            )
            size["longest_edge"] = per_frame * n
        frame_size = video_frame_size(
            n, height, width, size, self.factor, self.video_frame_multiple
        )
        patches, grid = video_patches(
            self.image_processor, video.frames, self.video_size, frame_size, **self.normalize
        )
        return {"pixel_values_videos": patches, "video_grid_thw": grid}

    def video_text(self, arrays: dict[str, Any], video: Any) -> str:
        """Each temporal patch's timestamp, then its placeholders between vision start/end."""
        t, h, w = (int(x) for x in arrays["video_grid_thw"][0])
        frame = self.video_pad * (h * w // self.merge_tokens)
        return "".join(
            f"<{seconds:.1f} seconds>{self.vision_start}{frame}{self.vision_end}"
            for seconds in frame_times(video.indices, video.native_fps, self.video_frame_multiple)
        )


def frame_times(indices: list[int], fps: float, temporal: int) -> list[float]:
    """Seconds into the video of each temporal patch of the frames at `indices`: the mean of
    its first and last frame's time (the last frame repeated to fill the last patch)."""
    indices = list(indices) + [indices[-1]] * (-len(indices) % temporal)
    times = [i / fps for i in indices]
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


class Qwen3VLSpec(Qwen2VLSpec):
    family = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)

    def image_processor(self, model_dir: str) -> ImageProcessor:
        return Qwen3VLImages(model_dir, self.hf_config(model_dir))


class Qwen3VLMoeSpec(Qwen3VLSpec):
    """Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B): Qwen3-VL's input side; its decoder's MLPs are
    mixtures of experts (the compute side's)."""

    family = "qwen3_vl_moe"
    architectures = ("Qwen3VLMoeForConditionalGeneration",)


SPECS = [Qwen3VLSpec(), Qwen3VLMoeSpec()]
