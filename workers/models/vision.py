"""The vision half of a Hugging Face vision-language model: tower, projector, packing.

Vision towers run once per image, not per token, so we use transformers' own modules for
them (CLIP, the Qwen2-VL ViT, the LLaVA projectors, LLaVA-NeXT's any-resolution packing):
the multimodal model class of the checkpoint, built from the vision-side fields of its config
with a language model of nothing, then dropped, since our paged decoder replaces it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import transformers
from torch import nn


def build_vision_half(hf_config: Any, class_name: str) -> nn.Module:
    """transformers' multimodal model `class_name` for `hf_config`, minus its language model.

    Its language model is built only to be dropped, from a config of its own class that keeps
    nothing of the checkpoint's text config but the width the projector maps into: no other
    field (pad and special token ids, layer types, RoPE settings) can break building it.
    """
    config = copy.deepcopy(hf_config)
    text = hf_config.text_config
    config.text_config = type(text)(
        hidden_size=text.hidden_size,
        num_hidden_layers=0,
        vocab_size=1,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    half = getattr(transformers, class_name)(config)
    # Idefics3 and SmolVLM call their language model text_model.
    delattr(half, "language_model" if hasattr(half, "language_model") else "text_model")
    return half.eval()


def drop_layers_past_features(half: nn.Module) -> list[str]:
    """Remove the tower's encoder layers after the last one `vision_feature_layer` reads
    (LLaVA's -2: CLIP's last layer runs for nothing in transformers, 1 of 24 in LLaVA-1.5-7B's
    tower), pointing the config at the same hidden states of the shorter stack. Returns the
    names, under `half`, of the parameters dropped (their checkpoint tensors load nowhere)."""
    selected = getattr(half.config, "vision_feature_layer", None)
    layers = getattr(getattr(getattr(half, "vision_tower", None), "encoder", None), "layers", None)
    if selected is None or not isinstance(layers, nn.ModuleList):
        return []
    total = len(layers)
    # hidden_states holds the embeddings' output, then each layer's: total + 1 entries.
    wanted = [
        i if i >= 0 else total + 1 + i
        for i in (selected if isinstance(selected, list) else [selected])
    ]
    keep = max(wanted)
    if keep >= total:
        return []
    half.vision_tower.encoder.layers = layers[:keep]
    half.config.vision_feature_layer = wanted if isinstance(selected, list) else wanted[0]
    return [f"vision_tower.encoder.layers.{i}." for i in range(keep, total)]


class VisionEncoder(nn.Module):
    """Turns a batch of preprocessed images into one embedding row per placeholder token."""

    def __init__(self, hf_config: Any, class_name: str) -> None:
        super().__init__()
        self.hf = build_vision_half(hf_config, class_name)
        self.dropped = ["hf." + name for name in drop_layers_past_features(self.hf)]

    def forward(self, arrays: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """`arrays` as the model's image processor names them (pixel_values, image_sizes,
        image_grid_thw), batched over images; returns [placeholders, hidden] per image."""
        return list(self.image_features(arrays).pooler_output)

    def image_features(self, arrays: dict[str, torch.Tensor]) -> Any:
        """transformers' `get_image_features` output for the batch, in the tower's dtype (its
        `get_video_features` for a batch of videos: Qwen-VL's `pixel_values_videos`)."""
        dtype = next(self.hf.parameters()).dtype
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in arrays.items()}
        if "pixel_values_videos" in inputs:
            videos, grids = inputs["pixel_values_videos"], inputs["video_grid_thw"]
            return self.hf.get_video_features(videos, grids, return_dict=True)
        return self.hf.get_image_features(**inputs, return_dict=True)
