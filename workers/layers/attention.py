"""Attention over the paged KV cache in plain torch (the reference path, used on CPU).

The cache of one layer is two tensors [num_slots, kv_heads, head_dim], a slot being
block_id * block_size + offset. New keys and values are written at the step's slot
mapping; then prefills attend per sequence and decodes attend as one padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.forward_context import current


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Set once when the cache is allocated: ([num_slots, kv_heads, head_dim]) * 2.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]."""
        ctx = current()
        self.k_cache.index_copy_(0, ctx.slot_mapping, k)
        self.v_cache.index_copy_(0, ctx.slot_mapping, v)
        out = torch.empty_like(q)
        for span in ctx.prefills:
            rows = slice(span.q_start, span.q_start + span.q_len)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], span.ctx_len, span.ctx_slots)
        if ctx.decode_token_idx is not None:
            out[ctx.decode_token_idx] = self._decode(
                q[ctx.decode_token_idx], ctx.decode_slots, ctx.decode_mask
            )
        return out

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx_len: int,
        ctx_slots: torch.Tensor | None,
    ) -> torch.Tensor:
        q_len = q.shape[0]
        if ctx_slots is None:  # nothing cached before: plain causal attention
            mask, causal = None, True
        else:
            k, v = self.k_cache[ctx_slots], self.v_cache[ctx_slots]  # [ctx_len, kv_heads, dim]
            query_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= query_pos[:, None]
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [heads, q_len, dim]
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=True,
        )
        return out.transpose(0, 1)

    def _decode(self, q: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        k = self.k_cache[slots].transpose(1, 2)  # [decodes, kv_heads, longest, dim]
        v = self.v_cache[slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [decodes, heads, 1, dim]
            k,
            v,
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=True,
        )
        return out.squeeze(2)
