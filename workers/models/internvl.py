"""InternVL3 / 3.5 (Hugging Face format): transformers' InternViT tower, pixel shuffle and MLP
projector (its `get_image_features`), our Qwen2, Qwen3 or Llama decoder.

An image arrives as its tiles (`pixel_values` [tiles, 3, size, size]) and their count
(`num_patches` [1]); the tower embeds every tile of a step's images in one batch, and each
image gets its tiles' rows one after the other, as many as the processor wrote placeholders.
"""

from __future__ import annotations

import torch

from vlmserve.workers.models.llava import NAME_PREFIXES
from vlmserve.workers.models.vision import VisionEncoder
from vlmserve.workers.models.vlm import VisionLanguageModel


class TiledVisionEncoder(VisionEncoder):
    def forward(self, arrays: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per image [tiles * rows per tile, hidden]."""
        tiles = [int(n) for n in arrays["num_patches"]]
        out = self.image_features({"pixel_values": arrays["pixel_values"]}).pooler_output
        # out: [all tiles, rows per tile, hidden]
        return [rows.flatten(0, 1) for rows in torch.split(out, tiles)]


class InternVLModel(VisionLanguageModel):
    vision_half = "InternVLModel"
    name_prefixes = NAME_PREFIXES  # vision_tower., multi_modal_projector., language_model.
    encoder = TiledVisionEncoder
