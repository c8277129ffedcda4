"""Llama-family decoders (Llama, Mistral, Qwen2, Qwen3): GQA, RoPE, tied embeddings, TP layers.

Qwen3 differs only by an RMSNorm over each query and key head before RoPE (`qk_norm`);
Mistral and Qwen2 (use_sliding_window) by a sliding window in some or all layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.workers.layers.attention import PagedAttention
from vlmserve.workers.layers.deepstack import LayerAdditions
from vlmserve.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vlmserve.workers.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vlmserve.workers.layers.norm import RMSNorm
from vlmserve.workers.layers.rotary import Rope, RotaryEmbedding, apply_rope_


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None: the whole context), as transformers reads the config:
    `layer_types` ("sliding_attention" / "full_attention" per layer) where the config has it
    (Qwen2: the layers from max_window_layers on), else the window in every layer (Mistral);
    none without a window or with use_sliding_window off."""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return [None] * layers
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in types[:layers]]
    return [window] * layers


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: Any,
        qkv_bias: bool,
        layer_idx: int,
        qk_norm: bool = False,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=qkv_bias,
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim,
            config.hidden_size,
            shard=self.qkv_proj.out_shard,  # this rank's heads, however they split
        )
        self.head_dim = head_dim
        # Qwen3: per-head RMSNorm of queries and keys (one weight shared by every head).
        norm = (lambda: RMSNorm(head_dim, config.rms_norm_eps)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.qk_norm = qk_norm
        proj = self.qkv_proj
        self.attn = PagedAttention(
            proj.num_heads, proj.num_kv_heads, head_dim, head_dim**-0.5, layer_idx, sliding_window
        )

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        proj, dim = self.qkv_proj, self.head_dim
        qkv = proj(x)  # [tokens, (heads + 2 * kv_heads) * head_dim], ours to write
        heads = proj.num_heads + proj.num_kv_heads
        if self.qk_norm:  # new q and k from their norms, each rotated in place
            q, k, v = qkv.split([proj.q_size, proj.kv_size, proj.kv_size], dim=-1)
            q = apply_rope_(rope, self.q_norm(q.view(-1, proj.num_heads, dim)))
            k = apply_rope_(rope, self.k_norm(k.view(-1, proj.num_kv_heads, dim)))
        else:  # queries and keys rotated together, in place in the GEMM's output
            qk = apply_rope_(rope, qkv[:, : heads * dim].view(-1, heads, dim))
            q, k = qk.split([proj.num_heads, proj.num_kv_heads], dim=1)
            v = qkv[:, heads * dim :]
        v = v.view(-1, proj.num_kv_heads, dim)
        out = self.attn(q, k, v)  # [tokens, heads, head_dim]
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter])
        self.down_proj = RowParallelLinear(inter, config.hidden_size)
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))  # one temporary, not two


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: Any,
        qkv_bias: bool,
        layer_idx: int,
        qk_norm: bool,
        sliding_window: int | None = None,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, qkv_bias, layer_idx, qk_norm, sliding_window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config) if mlp is None else mlp

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        # The residual adds go into the sublayers' outputs, fresh tensors (linear layers, MoE
        # blocks): a + x == x + a bit for bit, no new tensor per add, and `x` (at layer 0 maybe
        # the caller's embeddings) is never written.
        x = self.self_attn(rope, self.input_layernorm(x)).add_(x)
        return self.mlp(self.post_attention_layernorm(x)).add_(x)


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: Any,
        qkv_bias: bool,
        qk_norm: bool = False,
        layer_mlp: Callable[[Any, int], nn.Module | None] | None = None,
    ) -> None:
        """`layer_mlp(config, layer index)`: a layer's MLP where it is not Llama's (None)."""
        super().__init__()
        head_dim = head_dim_of(config)
        self.rotary = RotaryEmbedding(config, head_dim, config.max_position_embeddings)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        mlp = layer_mlp or (lambda config, i: None)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, qkv_bias, i, qk_norm, window, mlp(config, i))
            for i, window in enumerate(sliding_windows(config))
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
        additions: LayerAdditions | None = None,
    ) -> torch.Tensor:
        """`additions`: features added to the output of the first layers at some token rows
        (DeepStack); None, and no cost, for every other model."""
        x = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        rope = self.rotary(positions, x.dtype)  # the same angles for every layer
        for i, layer in enumerate(self.layers):
            x = layer(rope, x)
            if additions is not None and i < len(additions.levels):
                x = additions.add(i, x)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    # Checkpoint projections that live inside one merged parameter here, with their shard.
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias = False
    qk_norm = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = self.qkv_bias or getattr(config, "attention_bias", False)
        self.model = LlamaModel(config, bias, self.qk_norm, self.layer_mlp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def layer_mlp(self, config: Any, layer_idx: int) -> nn.Module | None:
        """A layer's MLP where it is not Llama's gated one (a mixture of experts); None."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)  # [tokens, vocab]


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral's decoder is Llama's, with its sliding window (if set) in every layer."""


# Decoders of multimodal checkpoints, by their text config's model_type.
_TEXT_DECODERS: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def decoder_for(text_config: Any) -> type[LlamaForCausalLM]:
    """The decoder class for a multimodal checkpoint's text config."""
    model_type = text_config.model_type
    if model_type not in _TEXT_DECODERS:
        supported = ", ".join(sorted(_TEXT_DECODERS))
        raise ValueError(f"unsupported text model_type {model_type!r}; supported: {supported}")
    return _TEXT_DECODERS[model_type]
