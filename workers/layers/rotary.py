"""Rotary position embeddings, with the `rope_scaling` types of Hugging Face configs.

The inverse frequencies come from transformers' own RoPE initialisers (linear, llama3,
yarn, longrope, ...), so every scaling type a config names is computed as transformers does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from vlmserve.workers.layers import cpu_rope


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict:
    """The config's RoPE settings; with `layer_type`, that kind of layer's own (Gemma 3 keeps
    one dict per layer type: a local base for its sliding layers, the scaled global one)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    if "rope_theta" not in params:
        params = {**params, "rope_theta": getattr(hf_config, "rope_theta", 10000.0)}
    return params


def inverse_frequencies(
    hf_config: Any, head_dim: int, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    """[head_dim // 2] inverse frequencies and the attention scaling of the config's type."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
        return 1.0 / (params["rope_theta"] ** exponent), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    per_type = {} if layer_type is None else {"layer_type": layer_type}
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **per_type)


def mrope_axes(params: dict, frequencies: int) -> torch.Tensor | None:
    """Which position (0 temporal, 1 height, 2 width) each rotary frequency takes its angle
    from, for a config with `mrope_section`; None for plain RoPE.

    Qwen2-VL's sections are contiguous runs of frequencies; with `mrope_interleaved`
    (Qwen3-VL) frequency j takes height if j % 3 == 1 and width if j % 3 == 2, each only within
    three times its section, and temporal otherwise (transformers' recomposition).
    """
    sections = params.get("mrope_section")
    if not sections:
        return None
    index = torch.arange(frequencies)
    if not params.get("mrope_interleaved"):
        bounds = torch.tensor(sections).cumsum(0)
        return torch.bucketize(index, bounds, right=True) % 3
    axes = torch.zeros(frequencies, dtype=torch.long)
    for axis in (1, 2):
        axes[(index % 3 == axis) & (index < 3 * sections[axis])] = axis
    return axes


class RotaryEmbedding(nn.Module):
    """Applies RoPE to queries and keys at given positions, from a precomputed table.

    Positions are [tokens], or [3, tokens] for multimodal RoPE: then each frequency takes its
    angle from the temporal, height or width position, as `mrope_axes` assigns them.
    """

    def __init__(
        self, hf_config: Any, head_dim: int, max_positions: int, layer_type: str | None = None
    ) -> None:
        super().__init__()
        # Computed on the CPU in float32 whatever device the model is built on (the loader
        # builds on the meta device, which holds no values), then moved with the model.
        with torch.device("cpu"):
            inv_freq, scaling = inverse_frequencies(hf_config, head_dim, layer_type)
            positions = torch.arange(max_positions, dtype=torch.float)
            freqs = positions[:, None] * inv_freq[None, :]
            axes = mrope_axes(rope_parameters(hf_config, layer_type), head_dim // 2)
        # [max_positions, head_dim // 2]; the two halves of a rotation share their angles
        self.register_buffer("cos_half", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin_half", freqs.sin() * scaling, persistent=False)
        self.register_buffer("mrope_axes", axes, persistent=False)  # [head_dim // 2] or None

    def _angles(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions.dim() == 1:
            half = table[positions]
        else:  # every frequency at every axis' position, then each frequency's own axis
            by_axis = table[positions]  # [3, tokens, head_dim // 2]
            axes = self.mrope_axes.expand(1, positions.shape[1], -1)
            half = by_axis.gather(0, axes)[0]
        return torch.cat((half, half), dim=-1).unsqueeze(1)  # [tokens, 1, head_dim]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """cos and sin at `positions`, [tokens, 1, head_dim]: once per step, for every layer."""
        cos = self._angles(self.cos_half, positions).to(dtype)
        return cos, self._angles(self.sin_half, positions).to(dtype)


Rope = tuple[torch.Tensor, torch.Tensor]


def apply_rope_(rope: Rope, x: torch.Tensor) -> torch.Tensor:
    """RoPE in place on x: [tokens, heads, head_dim] (queries, keys, or both as one view of
    the fused QKV output), as transformers' x * cos + rotate_half(x) * sin, bit for bit:
    with x1, x2 the halves, x1 * cos - x2 * sin and x2 * cos + x1 * sin. Two temporaries of
    half a head per head, no cat and no negation; returns x."""
    cos, sin = rope
    if cpu_rope.rope_(cos, sin, x):  # the same operations in one pass (float32, CPU)
        return x
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]  # the two halves share their angles
    x1, x2 = x[..., :half], x[..., half:]
    x1_sin = x1 * sin
    x2_sin = x2 * sin
    x1.mul_(cos).sub_(x2_sin)
    x2.mul_(cos).add_(x1_sin)
    return x
