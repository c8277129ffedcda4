"""Gemma 3: `Gemma3ForCausalLM` (text only, model_type gemma3_text) and
`Gemma3ForConditionalGeneration` (transformers' SigLIP tower and Gemma 3 projector, our decoder).

What differs from the Llama decoder, as transformers' Gemma 3 computes it:
- token embeddings scaled by sqrt(hidden_size), the factor cast to the weights' dtype first;
- Gemma's RMSNorm, x * (1 + w) in float32, four per layer: the attention's output and the
  MLP's output are normed before they join the residual stream;
- a GeGLU MLP (tanh-approximated GELU), q/k RMSNorm per head, scores scaled by
  query_pre_attn_scalar ** -0.5;
- sliding (local) and global layers by the config's `layer_types`, each kind with its own RoPE
  (a local base; the global one with its scaling, linear x8 on gemma-3-4b);
- final logits soft-capped when the config sets `final_logit_softcapping`.

Image soft tokens attend to each other both ways (transformers ORs a mask of each image's
token_type_ids run onto both its masks): the model says so with `bidirectional_images`, and
the runner passes each image's span to the attention metadata.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.workers.layers.attention import PagedAttention
from vlmserve.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vlmserve.workers.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vlmserve.workers.layers.rotary import Rope, RotaryEmbedding
from vlmserve.workers.models.llama import LlamaAttention, LlamaForCausalLM
from vlmserve.workers.models.llava import NAME_PREFIXES
from vlmserve.workers.models.vlm import VisionLanguageModel

SLIDING, GLOBAL = "sliding_attention", "full_attention"


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w) in float32, cast back after the weight (Llama's casts before)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


def check_supported(config: Any) -> None:
    """Refuse what this decoder does not compute (one line, at start)."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("attention logit soft-capping (attn_logit_softcapping) is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention (an encoder, not a decoder) is not supported")
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported hidden_activation {config.hidden_activation!r}")


class Gemma3Attention(LlamaAttention):
    """Llama's attention (fused QKV, per-head q/k norms, RoPE) with Gemma's norms, its score
    scale and, in sliding layers, the window."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, config.attention_bias, layer_idx, qk_norm=True)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        sliding = config.layer_types[layer_idx] == SLIDING
        proj = self.qkv_proj
        self.attn = PagedAttention(
            proj.num_heads,
            proj.num_kv_heads,
            self.head_dim,
            config.query_pre_attn_scalar**-0.5,
            layer_idx,
            sliding_window=config.sliding_window if sliding else None,
        )


class Gemma3MLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter])
        self.down_proj = RowParallelLinear(inter, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = Gemma3Attention(config, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = Gemma3MLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(x)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3TextModel(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        check_supported(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        # One RoPE table per kind of layer present (a local base, the scaled global one).
        self.rotary = nn.ModuleDict(
            {
                kind: RotaryEmbedding(config, config.head_dim, config.max_position_embeddings, kind)
                for kind in sorted(set(config.layer_types))
            }
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [tokens, hidden]
        # As transformers: the float32 factor cast to the weights' dtype (55.4256 -> 55.5 in bf16).
        return x * torch.tensor(self.embed_scale).to(x.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`input_embeds`, when given, are already scaled (image rows put into `embed`'s)."""
        x = self.embed(input_ids) if input_embeds is None else input_embeds
        ropes = {kind: rotary(positions, x.dtype) for kind, rotary in self.rotary.items()}
        for layer in self.layers:
            x = layer(ropes[layer.layer_type], x)
        return self.norm(x)


class Gemma3ForCausalLM(nn.Module):
    packed_modules = LlamaForCausalLM.packed_modules

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.model = Gemma3TextModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden)  # [tokens, vocab]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class Gemma3Model(VisionLanguageModel):
    """transformers' SigLIP tower and Gemma 3 projector (average pooling to
    mm_tokens_per_image rows, RMSNorm, a projection), our Gemma 3 decoder."""

    vision_half = "Gemma3Model"
    # transformers 4 checkpoints (the hub's gemma-3-*-it) and transformers 5 models: LLaVA's
    # names (its image_newline entries match nothing here).
    name_prefixes = NAME_PREFIXES
    bidirectional_images = True

    def decoder_class(self, text_config: Any) -> type[nn.Module]:
        return Gemma3ForCausalLM

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language.model.embed(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
        additions: Any = None,
    ) -> torch.Tensor:
        return self.language.model(input_ids, positions, input_embeds)
