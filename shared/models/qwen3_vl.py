"""Qwen3-VL: Qwen2-VL's image side (one `<|image_pad|>` per merged 2x2 patch between
`<|vision_start|>` and `<|vision_end|>`), sized by the image processor's `size`
(`shortest_edge` / `longest_edge` in pixels) with 16-pixel patches; interleaved multimodal RoPE
and DeepStack are the compute side's."""

from __future__ import annotations

from vlmserve.shared.models.qwen2_vl import Qwen2VLSpec
from vlmserve.shared.models.spec import ImageProcessor


class Qwen3VLSpec(Qwen2VLSpec):
    family = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)

    def image_processor(self, model_dir: str) -> ImageProcessor:
        images = super().image_processor(model_dir)
        # Videos not yet: Qwen3-VL writes a timestamp before each temporal patch's tokens and
        # places them in time differently; refused with a 400 rather than served wrong.
        images.video_frame_multiple = None
        return images


SPECS = [Qwen3VLSpec()]
