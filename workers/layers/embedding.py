"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of rows."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.workers.layers.linear import copy_into, linear, pack_weight, read_rows
from vlmserve.workers.parallel import all_reduce, gather_to_first, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        # The last rank's slice may be shorter; pad every slice to the same length.
        self.shard_size = -(-vocab_size // tp_size())
        self.vocab_start = tp_rank() * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        # With more ranks than rows to spare, the last ranks may hold padding only.
        size = min(self.shard_size, self.vocab_size - self.vocab_start)
        if size > 0:  # with more ranks than rows to spare, the last may hold padding only
            copy_into(param[:size], read_rows(loaded, self.vocab_start, size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over this rank's vocabulary slice, gathered into the whole vocabulary on rank 0,
    the rank that samples; every rank must call it alike (the gather is a collective)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        self.packed: torch.Tensor | None = None  # oneDNN's copy of the weight (pack)

    def pack(self, cpu_gemm: str) -> bool:
        """Compute logits on a packed copy of the weight as now loaded (a tied weight keeps
        serving the embedding lookup as it is); False where F.linear stays."""
        self.packed = pack_weight(self.weight, cpu_gemm)
        return self.packed is not None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[tokens, vocab] on rank 0; on other ranks their own slice, [tokens, slice]."""
        logits = gather_to_first(
            linear(hidden, self.weight, None, self.packed), dim=-1
        )  # [tokens, padded vocab]
        return logits[:, : self.vocab_size]
