"""Rotary position embeddings, with the `rope_scaling` types of Hugging Face configs.

The inverse frequencies come from transformers' own RoPE initialisers (linear, llama3,
yarn, longrope, ...), so every scaling type a config names is computed as transformers does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def rope_parameters(hf_config: Any) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if "rope_theta" not in params:
        params = {**params, "rope_theta": getattr(hf_config, "rope_theta", 10000.0)}
    return params


def inverse_frequencies(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """[head_dim // 2] inverse frequencies and the attention scaling of the config's type."""
    params = rope_parameters(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
        return 1.0 / (params["rope_theta"] ** exponent), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to queries and keys at given positions, from a precomputed table.

    Positions are [tokens], or [3, tokens] for multimodal RoPE (Qwen2-VL): then the
    frequencies are split into `mrope_section` chunks taking their angle from the temporal,
    height and width position in turn, as transformers does.
    """

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int) -> None:
        super().__init__()
        # Computed on the CPU in float32 whatever device the model is built on (the loader
        # builds on the meta device, which holds no values), then moved with the model.
        with torch.device("cpu"):
            inv_freq, scaling = inverse_frequencies(hf_config, head_dim)
            positions = torch.arange(max_positions, dtype=torch.float)
            freqs = positions[:, None] * inv_freq[None, :]
            sections = rope_parameters(hf_config).get("mrope_section")
            bounds = torch.tensor([0, *sections]).cumsum(0).tolist() if sections else []
        # [max_positions, head_dim // 2]; the two halves of a rotation share their angles
        self.register_buffer("cos_half", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin_half", freqs.sin() * scaling, persistent=False)
        self.mrope_chunks = list(zip(bounds[:-1], bounds[1:], strict=False))

    def _angles(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions.dim() == 1:
            half = table[positions]
        else:
            chunks = [table[positions[i % 3], a:b] for i, (a, b) in enumerate(self.mrope_chunks)]
            half = torch.cat(chunks, dim=-1)
        return torch.cat((half, half), dim=-1).unsqueeze(1)  # [tokens, 1, head_dim]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """cos and sin at `positions`, [tokens, 1, head_dim]: once per step, for every layer."""
        cos = self._angles(self.cos_half, positions).to(dtype)
        return cos, self._angles(self.sin_half, positions).to(dtype)


Rope = tuple[torch.Tensor, torch.Tensor]


def apply_rope(rope: Rope, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]."""
    cos, sin = rope
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
