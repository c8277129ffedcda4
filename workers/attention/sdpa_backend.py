"""The fast CPU backend (and a portable CUDA one): torch's fused SDPA kernels on 4-D inputs.

torch runs its fused (flash) CPU kernel only for [batch, heads, len, dim] inputs; the 3-D
calls of the reference fall back to the math kernel, which materialises every score. Here a
fresh prefill is one causal call on its own keys (no mask: the kernel skips the blocks above
the diagonal), a chunk after cached tokens attends to its context's whole blocks with a
bottom-right causal mask, and decodes attend in groups of similar length with the queries
that share a KV head folded into one matmul, over only the blocks their tables use.
One call per prefill rather than one padded call for all: padding computes the longest
prompt's square for every prompt and needs a mask, which turns off that block skipping.

A sliding window (per layer) or a bidirectional span (per sequence) is a mask of the one rule
(`metadata.attends`), planned once per distinct window for all layers that share it. A fresh
prompt no longer than the window, without spans, keeps the unmasked causal call; a longer one
is attended in tiles of queries, each over only the keys its window reaches (a mask over the
whole prompt would compute its whole square: 2048 tokens under a window of 512 took twice the
causal call's time); a chunk and a decode read only the blocks from the one holding their
oldest key in the window on.

On CPU, cpu_paged's kernels (when they could be built) read the cache in place through the
block tables instead: every decode, and every prefill or chunk that no bidirectional span
reaches (those keep the SDPA calls above, with their masks). `sdpa_gather` is this backend
without the C kernels: the torch paths above for everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vlmserve.workers.attention import cpu_paged, torch_backend
from vlmserve.workers.attention.backend import AttentionBackend
from vlmserve.workers.attention.metadata import AttentionMetadata, attends
from vlmserve.workers.attention.torch_backend import spans_in, window_in

if TYPE_CHECKING:
    from vlmserve.workers.kv_pool import KVPool
    from vlmserve.workers.layers.attention import PagedAttention

DECODE_GROUP = 8  # decodes attended together
TILE = 256  # queries per call of a windowed fresh prefill, at least the window


@dataclass(frozen=True)
class Prefill:
    """Queries [start, start + length) of one sequence; `blocks` when it has cached context."""

    start: int
    length: int
    blocks: torch.Tensor | None  # [blocks read] the part of the block table in use
    # [length, keys] True where it attends (keys: the blocks read, or the new ones); None:
    # plain causal over the new keys
    mask: torch.Tensor | None
    keys: slice | None = None  # rows of the step's new keys it attends, when not its own


@dataclass(frozen=True)
class Decodes:
    """Decodes of similar context length, attended together."""

    rows: torch.Tensor  # [decodes] rows of the batch
    blocks: torch.Tensor  # [decodes * most blocks] their block tables, padded, flattened
    # [kv_heads * decodes, 1, most blocks * block size] -inf past the context or the window
    bias: torch.Tensor


@dataclass
class SdpaStep:
    metadata: AttentionMetadata
    kv_heads: int
    dtype: torch.dtype
    paged: cpu_paged.PagedDecodes | None = None  # decodes for the in-place kernel, if it runs
    paged_prefills: cpu_paged.PagedPrefills | None = None  # prefills for the in-place kernel
    # Per sliding window (None: the whole context), what every layer with it shares.
    plans: dict[int | None, tuple[list[Prefill], list[Decodes]]] = field(default_factory=dict)

    def plan(self, window: int | None) -> tuple[list[Prefill], list[Decodes]]:
        window = window_in(self.metadata, window)
        if window not in self.plans:
            on_kernel = () if self.paged_prefills is None else self.paged_prefills.seqs.tolist()
            self.plans[window] = (
                prefills(self.metadata, window, frozenset(on_kernel)),
                decode_groups(self.metadata, DECODE_GROUP, self.kv_heads, self.dtype, window)
                if self.paged is None
                else [],
            )
        return self.plans[window]


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    paged_decode = True  # on CPU, attention reads the cache in place (cpu_paged), when it builds

    def __init__(self, pool: KVPool) -> None:
        super().__init__(pool)
        self._step: SdpaStep | None = None
        self._windows: set[int | None] = set()  # the layers' windows met so far
        cache = pool.cache
        use = self.paged_decode and cache.device.type == "cpu" and cache.dtype in cpu_paged.DTYPES
        self._kernel = cpu_paged.kernel() if use else None  # compiled here, once per machine

    def prepare(self, metadata: AttentionMetadata) -> None:
        # Plans once per distinct window, for all the layers that share it; a window not
        # met before (the first step) is planned when its first layer runs.
        paged = paged_prefills = None
        if self._kernel is not None:
            paged, paged_prefills = cpu_paged.plan_step(metadata)
        self._step = SdpaStep(
            metadata, self.pool.num_kv_heads, self.pool.cache.dtype, paged, paged_prefills
        )
        for window in self._windows:
            self._step.plan(window)

    def forward(
        self, layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        step = self._step
        if step is None:
            raise RuntimeError("the sdpa backend runs only after prepare()")
        self._windows.add(layer.sliding_window)
        prefill_plans, decode_plans = step.plan(layer.sliding_window)
        self.pool.store(layer.layer_idx, step.metadata.slot_mapping, k, v)
        # [2 * kv_heads, num_blocks, block_size * head_dim]: keys then values, one gather.
        kv_blocks = self.pool.cache[layer.layer_idx].view(
            2 * layer.num_kv_heads, self.pool.num_blocks, -1
        )
        out = torch.empty_like(q)
        for p in prefill_plans:
            rows = slice(p.start, p.start + p.length)
            keys = rows if p.keys is None else p.keys
            out[rows] = self._prefill(layer, kv_blocks, q[rows], k[keys], v[keys], p)
        for group in decode_plans:
            out[group.rows] = self._decode(layer, kv_blocks, q[group.rows], group)
        if step.paged is not None or step.paged_prefills is not None:
            k_cache, v_cache = self.pool.kv(layer.layer_idx)
            q = q if q.stride(-1) == 1 else q.contiguous()
            kernel_args = (k_cache, v_cache, self.pool.block_size, layer.sliding_window)
            if step.paged is not None:
                cpu_paged.attend(self._kernel, step.paged, q, out, *kernel_args, layer.scale)
            if step.paged_prefills is not None:
                cpu_paged.attend_prefills(
                    self._kernel, step.paged_prefills, q, out, *kernel_args, layer.scale
                )
        return out

    def _prefill(
        self,
        layer: PagedAttention,
        kv_blocks: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        p: Prefill,
    ) -> torch.Tensor:
        q = q.transpose(0, 1)[None]  # [1, heads, length, dim]
        if p.blocks is None:  # nothing cached: the new keys are the whole context
            k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, kv_heads, len, dim]
        else:
            kv = kv_blocks.index_select(1, p.blocks)  # [2 * kv_heads, blocks, bs * dim]
            kv = kv.view(2, 1, layer.num_kv_heads, -1, layer.head_dim)
            k, v = kv[0], kv[1]  # [1, kv_heads, blocks * block_size, dim]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=p.mask,
            is_causal=p.mask is None,
            scale=layer.scale,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)

    def _decode(
        self, layer: PagedAttention, kv_blocks: torch.Tensor, q: torch.Tensor, group: Decodes
    ) -> torch.Tensor:
        """softmax(QK^T)V with the G queries of a KV head as the rows of one matmul.

        SDPA's fused CPU kernel is slower than this for one query per sequence (it splits
        work by query block), and GQA through it would repeat the gathered keys.
        """
        decodes, kv_heads, dim = q.shape[0], layer.num_kv_heads, layer.head_dim
        longest = group.bias.shape[-1]
        kv = kv_blocks.index_select(1, group.blocks)  # [2 * kv_heads, decodes * blocks, ...]
        kv = kv.view(2, kv_heads * decodes, longest, dim)
        queries = q.view(decodes, kv_heads, -1, dim).transpose(0, 1)  # [kv, decodes, G, dim]
        queries = queries.reshape(kv_heads * decodes, -1, dim)
        scores = torch.baddbmm(
            group.bias, queries, kv[0].transpose(-1, -2), alpha=layer.scale
        )  # [kv_heads * decodes, G, longest]
        out = torch.bmm(scores.softmax(dim=-1), kv[1])  # [kv_heads * decodes, G, dim]
        return out.view(kv_heads, decodes, -1, dim).transpose(0, 1).reshape(decodes, -1, dim)


def prefills(
    meta: AttentionMetadata, window: int | None = None, skip: frozenset[int] = frozenset()
) -> list[Prefill]:
    """The sequences after the decodes (but those in `skip`: the C kernel's); a chunk after
    cached tokens gets its blocks and its causal mask aligned to the bottom right (query i
    sees keys up to cached + i). Under a window a chunk reads from the block of its first
    query's oldest key on."""
    starts = meta.query_start_loc_cpu.tolist()
    lengths = meta.seq_lens_cpu.tolist()
    device, block = meta.block_tables.device, meta.block_size
    out = []
    for i in range(meta.num_decodes, meta.num_seqs):
        if i in skip:
            continue
        start, length, context = starts[i], starts[i + 1] - starts[i], lengths[i]
        spans = spans_in(meta, i, context - length, context)
        queries = torch.arange(context - length, context, device=device)
        if context == length:  # the new keys are the whole context
            if window is not None and context > window:
                out.extend(window_tiles(start, length, window, spans, device))
            elif spans:
                out.append(Prefill(start, length, None, attends(queries, queries, window, spans)))
            else:  # the kernel's own causal mask, with block skipping
                out.append(Prefill(start, length, None, None))
            continue
        first = max(0, context - length - window + 1) // block if window is not None else 0
        num_blocks = -(-context // block)
        keys = torch.arange(first * block, num_blocks * block, device=device)
        mask = attends(queries, keys, window, spans)  # past the context: above every query
        out.append(Prefill(start, length, meta.block_tables[i, first:num_blocks].long(), mask))
    return out


def window_tiles(
    start: int, length: int, window: int, spans: tuple, device: torch.device
) -> list[Prefill]:
    """A fresh prompt (batch rows [start, start + length)) under a window, as tiles of queries
    each attending the new keys from its first query's oldest key in the window to its last
    query (or to the end of a span that holds one of its queries)."""
    size = max(window, TILE)
    tiles = []
    for first in range(0, length, size):
        end = min(first + size, length)
        inside = tuple((s, e) for s, e in spans if s < end and e > first)
        if end <= window and not inside:  # the window reaches back to position 0
            tiles.append(Prefill(start + first, end - first, None, None, slice(start, start + end)))
            continue
        key_from = max(0, first - window + 1)
        key_to = max([end] + [e for _, e in inside])
        mask = attends(
            torch.arange(first, end, device=device),
            torch.arange(key_from, key_to, device=device),
            window,
            inside,
        )
        keys = slice(start + key_from, start + key_to)
        tiles.append(Prefill(start + first, end - first, None, mask, keys))
    return tiles


def decode_groups(
    meta: AttentionMetadata,
    size: int,
    kv_heads: int,
    dtype: torch.dtype,
    window: int | None = None,
) -> list[Decodes]:
    """The reference's groups (sorted by context length, each padded only to its own
    longest, under a window only the blocks inside it), with the padding as a bias laid out
    head-major like the score matmul."""
    groups = []
    for group in torch_backend.decode_groups(meta, size, window):
        past = group.padding[:, 0]  # [decodes, keys]
        bias = torch.zeros(past.shape, dtype=dtype, device=past.device)
        bias.masked_fill_(past, -torch.inf)
        bias = bias[None, :, None].expand(kv_heads, -1, -1, -1).reshape(-1, 1, past.shape[-1])
        groups.append(Decodes(group.token_idx, group.blocks, bias))
    return groups


class SdpaGatherBackend(SdpaBackend):
    """sdpa without the C kernels: decodes on the gather path, prefills through torch's SDPA
    (the kernels' baseline: what a machine without a C compiler runs, and the way back
    should a kernel misbehave)."""

    name = "sdpa_gather"
    paged_decode = False
