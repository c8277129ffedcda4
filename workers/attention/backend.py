"""The interface every attention backend implements (one file per backend beside this one).

A backend is made once per worker over the KV pool. Each step it first turns the neutral
metadata into its own structures (`prepare`, like flashinfer's plan), then every attention
layer calls `forward` with that layer's q, k, v (like flashinfer's run).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from vlmserve.workers.attention.metadata import AttentionMetadata
    from vlmserve.workers.kv_pool import KVPool
    from vlmserve.workers.layers.attention import PagedAttention


class AttentionBackend(ABC):
    name: ClassVar[str]  # what --attention-backend calls it

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    @abstractmethod
    def prepare(self, metadata: AttentionMetadata) -> None:
        """Derive this backend's private data for a step; called once before its forward pass.

        Everything that is the same for all layers (masks, index tensors, kernel plans)
        belongs here, so that `forward` does only per-layer work.
        """

    @abstractmethod
    def forward(
        self, layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Write the step's new keys and values into `layer`'s cache and attend.

        q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim], rows in the order
        of the prepared metadata. Returns [tokens, heads, head_dim].
        """
