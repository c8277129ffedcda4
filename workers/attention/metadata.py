"""The per-step attention metadata every backend starts from, in the form kernel libraries take.

Sequences come decodes first (one new token each), then prefills and prefill chunks, as in
vLLM: a backend that treats the two apart finds its decodes in rows [0, num_decodes). The
tensors are on the model's device; the `_cpu` copies let a backend plan shapes (group sizes,
padded lengths) without reading the device back.

Which keys a query sees is one rule for every backend (`attends`): causal, cut to the layer's
sliding window if it has one, and opened both ways inside a bidirectional span (the tokens of
one image, for Gemma 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cu_seqlens of the step's new tokens
    seq_lens: torch.Tensor  # [num_seqs] int32: context length of each sequence after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with block 0
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot each new token's K/V goes to
    positions: torch.Tensor  # [num_tokens] int64: each new token's position in its sequence
    query_start_loc_cpu: torch.Tensor  # query_start_loc on the host
    seq_lens_cpu: torch.Tensor  # seq_lens on the host
    block_size: int
    num_seqs: int
    num_decodes: int  # the leading sequences that compute one token each
    num_tokens: int
    max_query_len: int
    max_seq_len: int
    # Per sequence, (start, end) position ranges, end exclusive, whose tokens all see each
    # other; None when no sequence of the step has any (then nothing costs anything).
    # The caller never splits a span across prefill chunks, so only prefill rows use them.
    bidirectional: tuple[tuple[tuple[int, int], ...], ...] | None = None


Spans = tuple[tuple[int, int], ...]


def attends(
    query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None, spans: Spans = ()
) -> torch.Tensor:
    """[queries, keys] bool: True where the query at `query_pos` attends the key at `key_pos`.

    The rule is transformers' (masking_utils, 5.x): a key is seen when it is not in the future
    (`causal_mask_function`, kv_idx <= q_idx) or shares a span with the query
    (`blockwise_overlay`, how Gemma 3 passes its image groups), AND, in a sliding layer, it is
    less than `window` positions back (`sliding_window_overlay`: kv_idx > q_idx - window, so a
    query sees itself and the window - 1 keys before it). Gemma 3 in transformers 5 builds its
    sliding mask as AND(window, OR(causal, span)) (`create_masks_for_vision_model`); 4.5x ORed
    the span onto the windowed mask instead. The two differ only for a span longer than the
    window (an image of 256 tokens against gemma-3-4b-it's window of 1024: never).
    """
    q, k = query_pos[:, None], key_pos[None, :]
    seen = k <= q
    for start, end in spans:
        seen |= (q >= start) & (q < end) & (k >= start) & (k < end)
    if window is not None:
        seen &= k > q - window
    return seen


def build_metadata(
    starts: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    bidirectional: list[list[tuple[int, int]] | None] | None = None,
) -> AttentionMetadata:
    """Metadata of sequences that compute tokens [start, start + query_len) each.

    The caller orders them decodes first. Slots come from the block tables and positions
    by arithmetic over the whole step, not per token. `bidirectional`: per sequence, its
    spans (see AttentionMetadata.bidirectional), or None.
    """
    num_seqs = len(starts)
    start = torch.tensor(starts, dtype=torch.int32)
    query_len = torch.tensor(query_lens, dtype=torch.int32)
    seq_lens = start + query_len
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32)
    torch.cumsum(query_len, 0, out=query_start_loc[1:])
    max_seq_len = int(seq_lens.max())
    tables = padded_block_tables(block_tables, -(-max_seq_len // block_size))
    num_tokens = int(query_start_loc[-1])
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), query_len.long())  # [tokens]
    offset = (start - query_start_loc[:-1]).long()  # position minus batch row, per sequence
    positions = torch.arange(num_tokens) + offset[seq_of_token]
    blocks = tables[seq_of_token, positions // block_size].long()
    num_decodes = 0
    while num_decodes < num_seqs and query_lens[num_decodes] == 1:
        num_decodes += 1
    return AttentionMetadata(
        query_start_loc=to_device(query_start_loc, device),
        seq_lens=to_device(seq_lens, device),
        block_tables=to_device(tables, device),
        slot_mapping=to_device(blocks * block_size + positions % block_size, device),
        positions=to_device(positions, device),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
        num_seqs=num_seqs,
        num_decodes=num_decodes,
        num_tokens=num_tokens,
        max_query_len=max(query_lens),
        max_seq_len=max_seq_len,
        bidirectional=spans_of(bidirectional, num_seqs),
    )


def spans_of(
    bidirectional: list[list[tuple[int, int]] | None] | None, num_seqs: int
) -> tuple[Spans, ...] | None:
    """Each sequence's spans as tuples, checked; None when no sequence has one."""
    if not bidirectional or not any(bidirectional):
        return None
    if len(bidirectional) != num_seqs:
        raise ValueError(f"bidirectional has {len(bidirectional)} entries for {num_seqs} sequences")
    out = []
    for spans in bidirectional:
        spans = tuple((int(start), int(end)) for start, end in spans or ())
        if any(start < 0 or end <= start for start, end in spans):
            raise ValueError(f"bidirectional spans must be 0 <= start < end: {spans}")
        out.append(spans)
    return tuple(out)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To CUDA through pinned memory, without blocking the host: the
    copy is queued on the current stream ahead of the kernels that read it, and the caching
    host allocator keeps the pinned buffer until the copy is done. (A pageable copy waits.)"""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def padded_block_tables(block_tables: list[list[int]], width: int) -> torch.Tensor:
    """[seqs, width] int32: each table cut or padded with block 0 to `width` blocks."""
    rows = [table[:width] + [0] * (width - len(table[:width])) for table in block_tables]
    return torch.tensor(rows, dtype=torch.int32).view(len(block_tables), width)
