"""Mistral 3 (Mistral Small 3.1 / 3.2 in Hugging Face format): transformers' Pixtral tower
(variable resolution, 2D RoPE, each image attending only to itself) and Mistral3's projector
(RMSNorm, the patch merger of spatial_merge_size^2 neighbouring patches, two linears), our
Mistral decoder.

An image's span in the prompt holds its `[IMG_BREAK]` row ends (`image_span_holds_text`): only
the `[IMG]` rows take the encoder's output.
"""

from __future__ import annotations

import torch

from vlmserve.workers.models.llava import NAME_PREFIXES
from vlmserve.workers.models.vision import VisionEncoder
from vlmserve.workers.models.vlm import VisionLanguageModel


class PatchedImageEncoder(VisionEncoder):
    def forward(self, arrays: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """`arrays`: every image's `pixel_patches` one after another ([patches, 3, p, p], each
        image's in row-major order) and `image_sizes` [images, 2] in pixels; returns per image
        [merged rows * merged cols, hidden], in the order of its [IMG] tokens."""
        sizes = arrays["image_sizes"].tolist()
        patches = arrays["pixel_patches"]
        p = patches.shape[-1]
        counts = [(h // p) * (w // p) for h, w in sizes]
        # The tower takes a padded batch [images, 3, H, W] and crops each image to its size
        # again, so the padding never reaches an image's rows.
        batch = patches.new_zeros(len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
        for i, (image, (h, w)) in enumerate(zip(torch.split(patches, counts), sizes, strict=True)):
            grid = image.view(h // p, w // p, 3, p, p).permute(2, 0, 3, 1, 4)
            batch[i, :, :h, :w] = grid.reshape(3, h, w)
        image_sizes = arrays["image_sizes"].to(torch.long)
        return list(self.image_features({"pixel_values": batch, "image_sizes": image_sizes})
                    .pooler_output)  # fmt: skip


class Mistral3Model(VisionLanguageModel):
    vision_half = "Mistral3Model"
    name_prefixes = NAME_PREFIXES  # vision_tower., multi_modal_projector., language_model.
    encoder = PatchedImageEncoder
    image_span_holds_text = True
