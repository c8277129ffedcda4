"""The attention layer of a decoder: its shape and its index into the KV pool.

What attention does in a step (writing new keys and values into the paged cache, then
attending) belongs to the step's backend (workers/attention/): the layer hands it q, k, v.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmserve.workers.attention.context import current


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        layer_idx: int,
        sliding_window: int | None = None,
    ) -> None:
        """`sliding_window`: a query at position p attends only keys at positions in
        (p - sliding_window, p], transformers' convention (masking_utils'
        sliding_window_overlay, kv_idx > q_idx - window: itself and window - 1 before it);
        None attends the whole context."""
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, not {sliding_window}")
        self.num_heads = num_heads  # on this rank
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = layer_idx  # which of the KV pool's layers holds this one's cache
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] -> like q."""
        return current().backend.forward(self, q, k, v)
