"""Mistral 3 in Hugging Face format (`Mistral3ForConditionalGeneration`: Mistral Small 3.1 / 3.2):
each image keeps its aspect ratio, resized so that its longest edge fits the processor's
`longest_edge` and both sides are whole multiples of a merged patch (`patch_size *
spatial_merge_size` pixels), and is written, as transformers' PixtralProcessor writes it, as
one row of `[IMG]` per row of merged patches, every row ended by `[IMG_BREAK]` and the last one
by `[IMG_END]`:

    [IMG][IMG][IMG][IMG_BREAK][IMG][IMG][IMG][IMG_BREAK][IMG][IMG][IMG][IMG_END]

so an image's placeholders are not one run: its span holds the row breaks, which keep their own
embeddings (the compute side sets `image_span_holds_text`). PixtralProcessor needs torchvision,
which has no build for our torch, so the image processor runs alone (with the processor's
merged patch size) and the expansion is done here.

The images of a prompt differ in size, so each travels as its patches, `pixel_patches`
[patches, 3, patch, patch] in row-major order, with its `image_sizes` [1, 2] (height, width in
pixels): any number of images of any sizes batch along the first dimension.
"""

from __future__ import annotations

import os
from typing import Any

from vlmserve.shared.models.processing import placeholder_runs, tokenize_rendered
from vlmserve.shared.models.spec import (
    LLAMA_FAMILY_DECODERS,
    ImageProcessor,
    ModelSpec,
    PlacedImage,
    read_json,
)


class Mistral3Images:
    def __init__(self, model_dir: str, hf_config: Any) -> None:
        import transformers

        self.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        published = read_json(os.path.join(model_dir, "processor_config.json"))
        self.image_token = published.get("image_token", "[IMG]")
        self.break_token = published.get("image_break_token", "[IMG_BREAK]")
        self.end_token = published.get("image_end_token", "[IMG_END]")
        self.image_token_id: int = hf_config.image_token_id
        if self.tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_id:
            raise ValueError(
                f"the tokenizer's {self.image_token} is not the config's image token "
                f"{self.image_token_id}"
            )
        self.patch = int(hf_config.vision_config.patch_size)
        merge = int(hf_config.spatial_merge_size)
        for key, value in (("patch_size", self.patch), ("spatial_merge_size", merge)):
            if int(published.get(key, value)) != value:
                raise ValueError(
                    f"processor_config.json's {key} {published[key]} is not the model's {value}"
                )
        self.merged = self.patch * merge  # pixels a side of one [IMG] token

    def expansion(self, height: int, width: int) -> str:
        rows, cols = height // self.merged, width // self.merged
        row = self.image_token * cols
        return (row + self.break_token) * (rows - 1) + row + self.end_token

    def process(self, text: str, images: list) -> tuple[list[int], list[PlacedImage]]:
        parts = text.split(self.image_token)
        if len(parts) != len(images) + 1:
            raise ValueError(f"{len(parts) - 1} image placeholders for {len(images)} images")
        if not images:
            return tokenize_rendered(self.tokenizer, text), []
        # Resized to whole merged patches, padded to the largest image of the batch.
        out = self.image_processor(images=images, patch_size=self.merged, return_tensors="np")
        sizes = [(int(h), int(w)) for h, w in out["image_sizes"]]
        text = parts[0] + "".join(
            self.expansion(h, w) + part for (h, w), part in zip(sizes, parts[1:], strict=True)
        )
        ids = tokenize_rendered(self.tokenizer, text)
        runs = placeholder_runs(ids, self.image_token_id)
        rows = [h // self.merged for h, _ in sizes]
        if len(runs) != sum(rows):
            raise ValueError("the prompt's text runs into its image placeholders")
        placed, first = [], 0
        for i, (h, w) in enumerate(sizes):
            image_runs = runs[first : first + rows[i]]
            first += rows[i]
            if any(n != w // self.merged for _, n in image_runs):
                raise ValueError("the prompt's text runs into its image placeholders")
            (start, _), (last, length) = image_runs[0], image_runs[-1]
            placed.append(PlacedImage(start, last + length - start, self._arrays(out, i, h, w)))
        return ids, placed

    def _arrays(self, out: Any, i: int, height: int, width: int) -> dict:
        import numpy as np

        p = self.patch
        pixels = out["pixel_values"][i, :, :height, :width]  # [3, height, width]
        # [3, rows, p, cols, p] -> [rows, cols, 3, p, p]: patches in row-major order
        patches = pixels.reshape(3, height // p, p, width // p, p).transpose(1, 3, 0, 2, 4)
        return {
            "pixel_patches": np.ascontiguousarray(patches.reshape(-1, 3, p, p)),
            "image_sizes": np.array([[height, width]], dtype=np.int64),
        }


class Mistral3Spec(ModelSpec):
    family = "mistral3"
    architectures = ("Mistral3ForConditionalGeneration",)
    text_decoders = LLAMA_FAMILY_DECODERS

    def image_processor(self, model_dir: str) -> ImageProcessor:
        return Mistral3Images(model_dir, self.hf_config(model_dir))


SPECS = [Mistral3Spec()]
