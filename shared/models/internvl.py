"""InternVL3 and InternVL3.5 in Hugging Face format (`InternVLForConditionalGeneration`, the
`-hf` checkpoints): each image is tiled by its aspect ratio into square tiles (plus a thumbnail
when there is more than one), and written as `<img>`, one `<IMG_CONTEXT>` per embedding row of
every tile, `</img>`.

Their AutoProcessor needs torchvision (for video), which has no build for our torch, so the
image processor (GotOcr2) runs alone and the expansion is done here, as InternVLProcessor does;
like it, images are always tiled (its call-time `crop_to_patches`), whatever the image
processor's saved config says.
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


class InternVLImages:
    def __init__(self, model_dir: str, hf_config: Any) -> None:
        import transformers

        self.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.image_token_id: int = hf_config.image_token_id
        self.context = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        # InternVLProcessor's names for the frame of an image; the published tokenizers name
        # them in tokenizer_config.json.
        self.start = getattr(self.tokenizer, "start_image_token", None) or "<img>"
        self.end = getattr(self.tokenizer, "end_image_token", None) or "</img>"
        processor = read_json(os.path.join(model_dir, "processor_config.json"))
        self.rows_per_tile = int(
            processor.get("image_seq_length") or getattr(hf_config, "image_seq_length", 256)
        )

    def process(self, text: str, images: list) -> tuple[list[int], list[PlacedImage]]:
        import numpy as np

        parts = text.split(self.context)
        if len(parts) != len(images) + 1:
            raise ValueError(f"{len(parts) - 1} image placeholders for {len(images)} images")
        out = self.image_processor(images=images, crop_to_patches=True, return_tensors="np")
        tiles = [int(n) for n in out["num_patches"]]
        text = parts[0] + "".join(
            f"{self.start}{self.context * (self.rows_per_tile * n)}{self.end}{part}"
            for n, part in zip(tiles, parts[1:], strict=True)
        )
        ids = tokenize_rendered(self.tokenizer, text)
        runs = placeholder_runs(ids, self.image_token_id)
        if len(runs) != len(images):
            raise ValueError(f"{len(runs)} image placeholder runs for {len(images)} images")
        bounds = np.cumsum([0, *tiles])
        return ids, [
            PlacedImage(
                offset,
                length,
                {
                    "pixel_values": out["pixel_values"][bounds[i] : bounds[i + 1]],
                    "num_patches": np.array([tiles[i]], dtype=np.int64),
                },
            )
            for i, (offset, length) in enumerate(runs)
        ]


class InternVLSpec(ModelSpec):
    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    text_decoders = LLAMA_FAMILY_DECODERS

    def image_processor(self, model_dir: str) -> ImageProcessor:
        return InternVLImages(model_dir, self.hf_config(model_dir))


SPECS = [InternVLSpec()]
