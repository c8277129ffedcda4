"""Qwen3-VL: Qwen2-VL's image side (one `<|image_pad|>` per merged 2x2 patch between
`<|vision_start|>` and `<|vision_end|>`), sized by the image processor's `size`
(`shortest_edge` / `longest_edge` in pixels) with 16-pixel patches; interleaved multimodal RoPE
and DeepStack are the compute side's."""

from __future__ import annotations

from vlmserve.shared.models.qwen2_vl import Qwen2VLSpec


class Qwen3VLSpec(Qwen2VLSpec):
    family = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)


SPECS = [Qwen3VLSpec()]
