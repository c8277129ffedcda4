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
    times_videos = False  # get_rope_index takes second_per_grid_ts (Qwen2.5-VL)

    def decoder_class(self, text_config: Any) -> type[Qwen2ForCausalLM]:
        return Qwen2ForCausalLM

    def __init__(self, hf_config: Any) -> None:
        super().__init__(hf_config)
        self.video_token_id: int = hf_config.video_token_id

    def rope_index(
        self,
        token_ids: torch.Tensor,
        grids: torch.Tensor | None,
        video_grids: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """The multimodal positions [3, tokens] of a sequence, and the offset that positions of
        later (text) tokens have from their index. Videos' temporal positions step by their
        time per temporal patch (Qwen2.5-VL's `second_per_grid_ts`; Qwen2-VL steps by 1)."""
        ids = token_ids[None]
        mm_types = (ids == self.image_token_id).int() + 2 * (ids == self.video_token_id).int()
        videos = {}
        if video_grids is not None:
            videos["video_grid_thw"] = video_grids
            if self.times_videos:
                videos["second_per_grid_ts"] = second_per_grid_ts
        positions, deltas = self.vision.hf.get_rope_index(
            ids, mm_types, image_grid_thw=grids, **videos
        )
        return positions[:, 0], int(deltas.flatten()[0])


class Qwen25VLModel(Qwen2VLModel):
    vision_half = "Qwen2_5_VLModel"
    times_videos = True
