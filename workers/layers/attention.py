"""Attention over the paged KV cache in plain torch (the reference path, used on CPU).

The cache of one layer is two tensors [kv_heads, num_slots, head_dim], a slot being
block_id * block_size + offset. Heads come first so that gathering a batch's slots gives
each head's keys contiguous, ready for a matmul without another copy. New keys and values
are written at the step's slot mapping; then prefills attend per sequence and decodes
attend as one padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.workers.forward_context import current


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.block_size = 0  # set with the cache
        # Set once when the cache is allocated: ([kv_heads, num_slots, head_dim]) * 2.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]."""
        ctx = current()
        self.k_cache.index_copy_(1, ctx.slot_mapping, k.transpose(0, 1))
        self.v_cache.index_copy_(1, ctx.slot_mapping, v.transpose(0, 1))
        out = torch.empty_like(q)
        for span in ctx.prefills:
            rows = slice(span.q_start, span.q_start + span.q_len)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], span.ctx_len, span.ctx_slots)
        for group in ctx.decodes:
            out[group.token_idx] = self._decode(
                q[group.token_idx], group.block_tables, group.padding
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
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # [kv_heads, q_len, dim]
            mask, causal = None, True
        else:
            k = self.k_cache.index_select(1, ctx_slots)  # [kv_heads, ctx_len, dim]
            v = self.v_cache.index_select(1, ctx_slots)
            query_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= query_pos[:, None]
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [heads, q_len, dim]
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=True,
        )
        return out.transpose(0, 1)

    def _decode(
        self, q: torch.Tensor, block_tables: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """One query per sequence; queries sharing a KV head are grouped into one matmul.

        A plain softmax(QK^T)V here: SDPA's CPU kernels are slow for single-query batches
        with a padding mask, and repeating KV heads for them would copy the cache again.
        """
        decodes = q.shape[0]
        longest = padding.shape[-1]
        shape = (self.num_kv_heads, decodes, longest, self.head_dim)
        k = self._gather_blocks(self.k_cache, block_tables).view(shape)
        v = self._gather_blocks(self.v_cache, block_tables).view(shape)
        group = q.view(decodes, self.num_kv_heads, -1, self.head_dim).transpose(0, 1)
        scores = torch.matmul(group, k.transpose(-1, -2)) * self.scale  # [kv, decodes, G, longest]
        scores.masked_fill_(padding, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v)  # [kv_heads, decodes, G, dim]
        return out.transpose(0, 1).reshape(decodes, self.num_heads, self.head_dim)

    def _gather_blocks(self, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """[kv_heads, decodes * blocks, block_size * dim]: whole blocks, each one contiguous
        per head, so the copy moves kilobytes at a time rather than one token's row."""
        blocks = cache.view(self.num_kv_heads, -1, self.block_size * self.head_dim)
        return blocks.index_select(1, block_tables.flatten())
