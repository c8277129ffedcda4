"""Qwen3-VL and Qwen3-VL-MoE: transformers' ViT (learned position grid, 2D RoPE, patch merger,
DeepStack mergers) and our Qwen3 decoder with interleaved multimodal RoPE and DeepStack (with
mixture-of-experts MLPs in the MoE variant, workers/layers/moe.py).

Videos: the frames' rows go to the `<|video_pad|>`s of the video's span (the timestamps and
vision start/end tokens between temporal patches keep their own embeddings), and
transformers' get_rope_index places each temporal patch in time after its timestamp text.

The vision tower returns, per image, the placeholders' embeddings and one more row per
placeholder for each of its `deepstack_visual_indexes`; those levels are added to the outputs
of the first decoder layers at the image's token rows (workers/layers/deepstack.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmserve.workers.layers.moe import SparseMoeBlock
from vlmserve.workers.layers.rotary import rope_parameters
from vlmserve.workers.models.llama import Qwen3ForCausalLM
from vlmserve.workers.models.qwen2_vl import NAME_PREFIXES, Qwen2VLModel
from vlmserve.workers.models.vision import VisionEncoder


class DeepstackVisionEncoder(VisionEncoder):
    def forward(self, arrays: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per image [placeholders, hidden * (1 + levels)]: the embeddings, then each level."""
        out = self.image_features(arrays)
        per_level = zip(*out.deepstack_features, strict=True)  # per image: its levels
        return [
            torch.cat((main, *levels), dim=-1)
            for main, levels in zip(out.pooler_output, per_level, strict=True)
        ]


class Qwen3VLTextForCausalLM(Qwen3ForCausalLM):
    """transformers' Qwen3-VL text model interleaves the multimodal RoPE whatever its config
    says (Qwen2-VL's runs of frequencies are never used), with sections [24, 20, 20] unless
    the config names others."""

    def __init__(self, config: Any) -> None:
        params = {"mrope_section": [24, 20, 20], **rope_parameters(config)}
        config.rope_parameters = {**params, "mrope_interleaved": True}
        super().__init__(config)


class Qwen3VLMoeTextForCausalLM(Qwen3VLTextForCausalLM):
    """Qwen3-VL-MoE's decoder: a mixture of experts as the MLP of every `decoder_sparse_step`-th
    layer not in `mlp_only_layers`, Llama's gated MLP in the others."""

    def layer_mlp(self, config: Any, layer_idx: int) -> nn.Module | None:
        sparse = (
            layer_idx not in (config.mlp_only_layers or [])
            and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0
        )
        if not sparse:
            return None
        return SparseMoeBlock(
            config.hidden_size,
            config.moe_intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
        )


class Qwen3VLModel(Qwen2VLModel):
    vision_half = "Qwen3VLModel"
    name_prefixes = NAME_PREFIXES
    encoder = DeepstackVisionEncoder
    # A video's span holds each temporal patch's timestamp and vision start/end tokens.
    image_span_holds_text = True

    def placeholder_ids(self) -> torch.Tensor:
        return torch.tensor([self.image_token_id, self.video_token_id])

    def decoder_class(self, text_config: Any) -> type[Qwen3ForCausalLM]:
        return Qwen3VLTextForCausalLM


class Qwen3VLMoeModel(Qwen3VLModel):
    vision_half = "Qwen3VLMoeModel"

    def decoder_class(self, text_config: Any) -> type[Qwen3ForCausalLM]:
        return Qwen3VLMoeTextForCausalLM
