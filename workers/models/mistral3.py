"""Mistral 3 (Mistral Small 3.1 / 3.2 in Hugging Face format): transformers' Pixtral tower
(variable resolution, 2D RoPE, each image attending only to itself) and Mistral3's projector
(RMSNorm, the patch merger of spatial_merge_size^2 neighbouring patches, two linears), our
Mistral decoder.

An image's span in the prompt holds its `[IMG_BREAK]` row ends (`image_span_holds_text`): only
the `[IMG]` rows take the encoder's output.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmserve.workers.models.llava import NAME_PREFIXES
from vlmserve.workers.models.vision import VisionEncoder
from vlmserve.workers.models.vlm import VisionLanguageModel


class PatchedImageEncoder(VisionEncoder):
    def __init__(self, hf_config: Any, class_name: str) -> None:
        super().__init__(hf_config, class_name)
        vision = hf_config.vision_config
        # Patches of one tower call: the tower attends over all of them at once, masked to
        # each image's own (a [patches, patches] mask), so a step with many large images
        # goes through in groups no larger than one image of the largest size.
        self.max_patches = (vision.image_size // vision.patch_size) ** 2

    def forward(self, arrays: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """`arrays`: every image's `pixel_patches` one after another ([patches, 3, p, p], each
        image's in row-major order) and `image_sizes` [images, 2] in pixels; returns per image
        [merged rows * merged cols, hidden], in the order of its [IMG] tokens."""
        sizes = [(int(h), int(w)) for h, w in arrays["image_sizes"].tolist()]
        p = arrays["pixel_patches"].shape[-1]
        counts = [(h // p) * (w // p) for h, w in sizes]
        images = torch.split(arrays["pixel_patches"], counts)
        groups: list[list[int]] = []
        total = 0
        for i, n in enumerate(counts):
            if groups and total + n <= self.max_patches:
                groups[-1].append(i)
                total += n
            else:
                groups.append([i])
                total = n
        return [
            rows
            for group in groups
            for rows in self._tower([images[i] for i in group], [sizes[i] for i in group])
        ]

    def _tower(self, images: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list:
        p = images[0].shape[-1]
        # The tower takes a padded batch [images, 3, H, W] and crops each image to its size
        # again, so the padding never reaches an image's rows.
        batch = images[0].new_zeros(
            len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes)
        )
        for i, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
            grid = image.view(h // p, w // p, 3, p, p).permute(2, 0, 3, 1, 4)
            batch[i, :, :h, :w] = grid.reshape(3, h, w)
        image_sizes = torch.tensor(sizes, dtype=torch.long, device=batch.device)
        features = self.image_features({"pixel_values": batch, "image_sizes": image_sizes})
        return list(features.pooler_output)


class Mistral3Model(VisionLanguageModel):
    vision_half = "Mistral3Model"
    name_prefixes = NAME_PREFIXES  # vision_tower., multi_modal_projector., language_model.
    encoder = PatchedImageEncoder
    image_span_holds_text = True
