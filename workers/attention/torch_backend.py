"""The reference backend in plain torch (and the CPU path): SDPA for prefills, grouped
matmuls for decodes, over gathered cache blocks. Every other backend is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vlmserve.workers.attention.backend import AttentionBackend
from vlmserve.workers.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from vlmserve.workers.kv_pool import KVPool
    from vlmserve.workers.layers.attention import PagedAttention

DECODE_GROUP = 8  # decodes attended together (8 measured faster than 4, 16, 32 at batch 64)


@dataclass(frozen=True)
class PrefillSpan:
    """Queries [q_start, q_start + q_len) of one sequence attending to `ctx_len` keys."""

    q_start: int
    q_len: int
    ctx_len: int
    ctx_slots: torch.Tensor | None  # [ctx_len] cache slots; None when nothing was cached


@dataclass(frozen=True)
class DecodeGroup:
    """Sequences of similar context length that decode one token each, attended together."""

    token_idx: torch.Tensor  # [decodes] rows of the batch
    blocks: torch.Tensor  # [decodes * most blocks] their block tables, padded, flattened
    padding: torch.Tensor  # [decodes, 1, most blocks * block size] True past the context


@dataclass(frozen=True)
class TorchStep:
    slot_mapping: torch.Tensor  # [tokens]
    prefills: list[PrefillSpan]
    decodes: list[DecodeGroup]


class TorchBackend(AttentionBackend):
    name = "torch"

    def __init__(self, pool: KVPool) -> None:
        super().__init__(pool)
        self._step: TorchStep | None = None  # this step's structures, from prepare()

    def prepare(self, metadata: AttentionMetadata) -> None:
        self._step = TorchStep(
            metadata.slot_mapping, prefill_spans(metadata), decode_groups(metadata)
        )

    def forward(
        self, layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        step = self._step
        if step is None:
            raise RuntimeError("the torch backend runs only after prepare()")
        self.pool.store(layer.layer_idx, step.slot_mapping, k, v)
        out = torch.empty_like(q)
        for span in step.prefills:
            rows = slice(span.q_start, span.q_start + span.q_len)
            out[rows] = self._prefill(layer, q[rows], k[rows], v[rows], span)
        for group in step.decodes:
            out[group.token_idx] = self._decode(layer, q[group.token_idx], group)
        return out

    def _prefill(
        self,
        layer: PagedAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: PrefillSpan,
    ) -> torch.Tensor:
        if span.ctx_slots is None:  # nothing cached before: plain causal attention
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # [kv_heads, q_len, dim]
            mask, causal = None, True
        else:
            k_cache, v_cache = self.pool.kv(layer.layer_idx)
            k = k_cache.index_select(1, span.ctx_slots)  # [kv_heads, ctx_len, dim]
            v = v_cache.index_select(1, span.ctx_slots)
            query_pos = torch.arange(span.ctx_len - span.q_len, span.ctx_len, device=q.device)
            mask = torch.arange(span.ctx_len, device=q.device)[None, :] <= query_pos[:, None]
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [heads, q_len, dim]
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=layer.scale,
            enable_gqa=True,
        )
        return out.transpose(0, 1)

    def _decode(self, layer: PagedAttention, q: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        """One query per sequence; queries sharing a KV head are grouped into one matmul.

        A plain softmax(QK^T)V here: SDPA's CPU kernels are slow for single-query batches
        with a padding mask, and repeating KV heads for them would copy the cache again.
        """
        decodes, kv_heads, dim = q.shape[0], layer.num_kv_heads, layer.head_dim
        longest = group.padding.shape[-1]
        shape = (kv_heads, decodes, longest, dim)
        # Whole blocks, each one contiguous per head: the copy moves kilobytes at a time.
        k_blocks, v_blocks = self.pool.blocks(layer.layer_idx)
        k = k_blocks.index_select(1, group.blocks).view(shape)
        v = v_blocks.index_select(1, group.blocks).view(shape)
        queries = q.view(decodes, kv_heads, -1, dim).transpose(0, 1)
        scores = (
            torch.matmul(queries, k.transpose(-1, -2)) * layer.scale
        )  # [kv, decodes, G, longest]
        scores.masked_fill_(group.padding, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v)  # [kv_heads, decodes, G, dim]
        return out.transpose(0, 1).reshape(decodes, layer.num_heads, dim)


def prefill_spans(meta: AttentionMetadata) -> list[PrefillSpan]:
    """The sequences after the decodes, each attended on its own; a chunk after cached
    tokens attends to them too, so it gets all its context's slots."""
    starts = meta.query_start_loc_cpu.tolist()
    lengths = meta.seq_lens_cpu.tolist()
    offsets = torch.arange(meta.block_size, device=meta.block_tables.device)
    spans = []
    for i in range(meta.num_decodes, meta.num_seqs):
        q_start, q_len, ctx_len = starts[i], starts[i + 1] - starts[i], lengths[i]
        slots = None
        if ctx_len > q_len:
            table = meta.block_tables[i, : -(-ctx_len // meta.block_size)].long()
            slots = (table[:, None] * meta.block_size + offsets).flatten()[:ctx_len]
        spans.append(PrefillSpan(q_start, q_len, ctx_len, slots))
    return spans


def decode_groups(meta: AttentionMetadata, size: int = DECODE_GROUP) -> list[DecodeGroup]:
    """Decodes sorted by context length, `size` at a time: padding each group to its longest
    context gathers far fewer padded keys than padding the whole batch to the longest."""
    if meta.num_decodes == 0:
        return []
    device = meta.block_tables.device
    lengths = meta.seq_lens_cpu[: meta.num_decodes]
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    order_dev = order.to(device)
    positions = torch.arange(
        -(-meta.max_seq_len // meta.block_size) * meta.block_size, device=device
    )
    groups = []
    for first in range(0, meta.num_decodes, size):
        members = order_dev[first : first + size]  # decode rows are sequence indices
        longest = sorted_lengths[min(first + size, meta.num_decodes) - 1]
        num_blocks = -(-longest // meta.block_size)
        blocks = meta.block_tables[members, :num_blocks].flatten().long()
        padding = positions[: num_blocks * meta.block_size] >= meta.seq_lens[members, None]
        groups.append(DecodeGroup(members, blocks, padding[:, None, :]))
    return groups
