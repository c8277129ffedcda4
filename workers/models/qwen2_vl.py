"""Qwen2-VL and Qwen2.5-VL: transformers' ViT with its patch merger, our Qwen2 decoder with
multimodal RoPE (positions [3, tokens]: temporal, height, width)."""

from __future__ import annotations

from typing import Any

import torch

from vlmserve.workers.models.llama import Qwen2ForCausalLM
from vlmserve.workers.models.vlm import VisionLanguageModel

# The hub's layout (transformers 4) keeps the decoder under `model.`; transformers 5's under
# `model.language_model.`.
NAME_PREFIXES = [
    ("model.language_model.", "language.model."),
    ("lm_head.", "language.lm_head."),
    ("model.visual.", "vision.hf.visual."),
    ("visual.", "vision.hf.visual."),
    ("model.", "language.model."),
]


class Qwen2VLModel(VisionLanguageModel):
    vision_half = "Qwen2VLModel"
    name_prefixes = NAME_PREFIXES
    uses_mrope = True

    def decoder_class(self, text_config: Any) -> type[Qwen2ForCausalLM]:
        return Qwen2ForCausalLM

    def rope_index(
        self, token_ids: torch.Tensor, grids: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        """The multimodal positions [3, tokens] of a sequence, and the offset that positions of
        later (text) tokens have from their index."""
        ids = token_ids[None]
        mm_types = (ids == self.image_token_id).int()
        positions, deltas = self.vision.hf.get_rope_index(ids, mm_types, image_grid_thw=grids)
        return positions[:, 0], int(deltas.flatten()[0])


class Qwen25VLModel(Qwen2VLModel):
    vision_half = "Qwen2_5_VLModel"
