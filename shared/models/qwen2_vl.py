"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, `<|image_pad|>` expanded to one token per
merged 2x2 patch, multimodal RoPE (computed by the compute side).

Their AutoProcessor needs torchvision (for video), which has no build for our torch, so the
image processor runs alone and the placeholder expansion is done here, as their processor does.
"""

from __future__ import annotations

from typing import Any

from vlmserve.shared.models.processing import placeholder_runs, tokenize_rendered
from vlmserve.shared.models.spec import ImageProcessor, ModelSpec, PlacedImage


class QwenVLImages:
    def __init__(self, model_dir: str, hf_config: Any) -> None:
        import transformers

        self.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.image_token_id = hf_config.image_token_id
        self.pad = self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    def process(self, text: str, images: list) -> tuple[list[int], list[PlacedImage]]:
        import numpy as np

        out = self.image_processor(images=images, return_tensors="np")
        grids = out["image_grid_thw"]
        merge = self.image_processor.merge_size**2
        parts = text.split(self.pad)
        if len(parts) != len(images) + 1:
            raise ValueError(f"{len(parts) - 1} image placeholders for {len(images)} images")
        counts = [int(np.prod(g)) // merge for g in grids]
        text = parts[0] + "".join(self.pad * n + p for n, p in zip(counts, parts[1:], strict=True))
        ids = tokenize_rendered(self.tokenizer, text)
        bounds = np.cumsum([0, *[int(np.prod(g)) for g in grids]])
        runs = placeholder_runs(ids, self.image_token_id)
        if len(runs) != len(images):  # placeholders written next to each other merge
            raise ValueError(f"{len(runs)} image placeholder runs for {len(images)} images")
        return ids, [
            PlacedImage(
                offset,
                length,
                {
                    "pixel_values": out["pixel_values"][bounds[i] : bounds[i + 1]],
                    "image_grid_thw": grids[i : i + 1],
                },
            )
            for i, (offset, length) in enumerate(runs)
        ]


class Qwen2VLSpec(ModelSpec):
    family = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)

    def image_processor(self, model_dir: str) -> ImageProcessor:
        return QwenVLImages(model_dir, self.hf_config(model_dir))


class Qwen25VLSpec(Qwen2VLSpec):
    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)


SPECS = [Qwen2VLSpec(), Qwen25VLSpec()]
