"""The reference backend in plain torch (and the CPU path): SDPA for prefills, grouped
matmuls for decodes, over gathered cache blocks. Every other backend is tested against it.

Sliding windows and bidirectional spans are masks of the one rule (`metadata.attends`); a
prefill over cached keys or under a window or span gets its mask in full, the plain way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vlmserve.workers.attention.backend import AttentionBackend
from vlmserve.workers.attention.metadata import AttentionMetadata, Spans, attends

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
    mask: torch.Tensor | None  # [q_len, ctx_len] True where it attends; None: plain causal


@dataclass(frozen=True)
class DecodeGroup:
    """Sequences of similar context length that decode one token each, attended together."""

    token_idx: torch.Tensor  # [decodes] rows of the batch
    blocks: torch.Tensor  # [decodes * most blocks] the blocks they read, padded, flattened
    # [decodes, 1, most blocks * block size] True past the context or before the window
    padding: torch.Tensor


@dataclass
class TorchStep:
    metadata: AttentionMetadata
    # Per sliding window (None: the whole context), what every layer with it shares.
    plans: dict[int | None, tuple[list[PrefillSpan], list[DecodeGroup]]] = field(
        default_factory=dict
    )

    def plan(self, window: int | None) -> tuple[list[PrefillSpan], list[DecodeGroup]]:
        window = window_in(self.metadata, window)
        if window not in self.plans:
            self.plans[window] = (
                prefill_spans(self.metadata, window),
                decode_groups(self.metadata, DECODE_GROUP, window),
            )
        return self.plans[window]


def window_in(meta: AttentionMetadata, window: int | None) -> int | None:
    """The window as it acts in this step: None when no sequence is longer than it."""
    return window if window is not None and meta.max_seq_len > window else None


class TorchBackend(AttentionBackend):
    name = "torch"

    def __init__(self, pool: KVPool) -> None:
        super().__init__(pool)
        self._step: TorchStep | None = None  # this step's structures, from prepare()
        self._windows: set[int | None] = set()  # the layers' windows met so far

    def prepare(self, metadata: AttentionMetadata) -> None:
        # Plans once per distinct window, for all the layers that share it; a window not
        # met before (the first step) is planned when its first layer runs.
        self._step = TorchStep(metadata)
        for window in self._windows:
            self._step.plan(window)

    def forward(
        self, layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        step = self._step
        if step is None:
            raise RuntimeError("the torch backend runs only after prepare()")
        self._windows.add(layer.sliding_window)
        prefills, decodes = step.plan(layer.sliding_window)
        self.pool.store(layer.layer_idx, step.metadata.slot_mapping, k, v)
        out = torch.empty_like(q)
        for span in prefills:
            rows = slice(span.q_start, span.q_start + span.q_len)
            out[rows] = self._prefill(layer, q[rows], k[rows], v[rows], span)
        for group in decodes:
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
        if span.ctx_slots is None:  # nothing cached before: the new keys are the context
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # [kv_heads, q_len, dim]
        else:
            k_cache, v_cache = self.pool.kv(layer.layer_idx)
            k = k_cache.index_select(1, span.ctx_slots)  # [kv_heads, ctx_len, dim]
            v = v_cache.index_select(1, span.ctx_slots)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [heads, q_len, dim]
            k,
            v,
            attn_mask=span.mask,
            is_causal=span.mask is None,
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


def spans_in(meta: AttentionMetadata, seq: int, first: int, end: int) -> Spans:
    """Sequence `seq`'s bidirectional spans that hold a query of positions [first, end)."""
    if meta.bidirectional is None:
        return ()
    return tuple((s, e) for s, e in meta.bidirectional[seq] if s < end and e > first)


def prefill_spans(meta: AttentionMetadata, window: int | None = None) -> list[PrefillSpan]:
    """The sequences after the decodes, each attended on its own; a chunk after cached
    tokens attends to them too, so it gets all its context's slots. Only a fresh prompt
    that neither a window nor a span reaches goes without a mask."""
    starts = meta.query_start_loc_cpu.tolist()
    lengths = meta.seq_lens_cpu.tolist()
    device = meta.block_tables.device
    offsets = torch.arange(meta.block_size, device=device)
    spans = []
    for i in range(meta.num_decodes, meta.num_seqs):
        q_start, q_len, ctx_len = starts[i], starts[i + 1] - starts[i], lengths[i]
        bidirectional = spans_in(meta, i, ctx_len - q_len, ctx_len)
        slots = mask = None
        if ctx_len > q_len:
            table = meta.block_tables[i, : -(-ctx_len // meta.block_size)].long()
            slots = (table[:, None] * meta.block_size + offsets).flatten()[:ctx_len]
        if slots is not None or bidirectional or (window is not None and ctx_len > window):
            queries = torch.arange(ctx_len - q_len, ctx_len, device=device)
            mask = attends(queries, torch.arange(ctx_len, device=device), window, bidirectional)
        spans.append(PrefillSpan(q_start, q_len, ctx_len, slots, mask))
    return spans


def decode_groups(
    meta: AttentionMetadata, size: int = DECODE_GROUP, window: int | None = None
) -> list[DecodeGroup]:
    """Decodes sorted by context length, `size` at a time: padding each group to its longest
    context gathers far fewer padded keys than padding the whole batch to the longest.

    Under a window a decode reads only the blocks from the one holding its oldest key in
    the window (position seq_len - window) on, and masks the keys before that position.
    """
    if meta.num_decodes == 0:
        return []
    device, block = meta.block_tables.device, meta.block_size
    lengths = meta.seq_lens_cpu[: meta.num_decodes]
    oldest = (lengths - window).clamp(min=0) if window is not None else torch.zeros_like(lengths)
    first_block = oldest // block
    need = (lengths + block - 1) // block - first_block  # blocks each decode reads
    order = torch.argsort(lengths, stable=True)
    order_dev = order.to(device)
    first_dev, oldest_dev = first_block.to(device).long(), oldest.to(device)
    width = meta.block_tables.shape[1]
    offsets = torch.arange(-(-meta.max_seq_len // block), device=device)
    keys = torch.arange(-(-meta.max_seq_len // block) * block, device=device)
    groups = []
    for start in range(0, meta.num_decodes, size):
        members = order[start : start + size]
        num_blocks = int(need[members].max())
        rows = order_dev[start : start + size]  # decode rows are sequence indices
        columns = (first_dev[rows, None] + offsets[:num_blocks]).clamp(max=width - 1)
        blocks = meta.block_tables[rows].gather(1, columns).flatten().long()
        positions = first_dev[rows, None] * block + keys[: num_blocks * block]
        padding = positions >= meta.seq_lens[rows, None]
        if window is not None:
            padding |= positions < oldest_dev[rows, None]
        groups.append(DecodeGroup(rows, blocks, padding[:, None, :]))
    return groups
