"""Idefics3 and SmolVLM: transformers' SigLIP-style tower and connector (pixel shuffle, then a
linear projection) on every frame of an image (its sub-images and the global one), our Llama
decoder.

An image's span in the prompt holds separator tokens between its frames' placeholders
(`image_span_holds_text`): only the `<image>` rows take the encoder's output.
"""

from __future__ import annotations

import torch

from vlmserve.workers.models.vision import VisionEncoder
from vlmserve.workers.models.vlm import VisionLanguageModel

# The hub's checkpoints (saved by transformers 4) and transformers 5 models name them alike.
NAME_PREFIXES = [
    ("model.text_model.", "language.model."),
    ("lm_head.", "language.lm_head."),
    ("model.vision_model.", "vision.hf.vision_model."),
    ("model.connector.", "vision.hf.connector."),
]


class FrameEncoder(VisionEncoder):
    def forward(self, arrays: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """`arrays` hold every image's frames one after another ([frames, 3, H, W] and the
        pixel mask) and `frames` [images], how many are each image's; returns per image
        [frames * image_seq_len, hidden], its frames' rows in order."""
        arrays = dict(arrays)
        counts = arrays.pop("frames").tolist()
        # Each frame a sample of one sub-image: transformers drops all-zero frames of a sample
        # as padding, so no frame's rows can depend on the frames batched with it.
        per_frame = {k: v.unsqueeze(1) for k, v in arrays.items()}
        rows = self.image_features(per_frame).pooler_output  # per frame [seq_len, hidden]
        return [torch.cat(group) for group in _split(rows, counts)]


def _split(items: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for n in counts:
        out.append(items[start : start + n])
        start += n
    return out


class Idefics3Model(VisionLanguageModel):
    vision_half = "Idefics3Model"
    name_prefixes = NAME_PREFIXES
    encoder = FrameEncoder
    image_span_holds_text = True


class SmolVLMModel(Idefics3Model):
    vision_half = "SmolVLMModel"
