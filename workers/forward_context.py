"""Per-step attention metadata, set for exactly one forward pass.

Layers read it with `current()` instead of threading it through every signature; a
`with step_context(ctx):` block sets it and refuses nesting, so it is never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


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
    block_tables: torch.Tensor  # [decodes, most blocks] padded with block 0
    padding: torch.Tensor  # [decodes, 1, most blocks * block size] True past the context


@dataclass(frozen=True)
class ForwardContext:
    slot_mapping: torch.Tensor  # [tokens] cache slot each new token's K/V is written to
    prefills: list[PrefillSpan]
    decodes: list[DecodeGroup]


_active: list[ForwardContext] = []


@contextmanager
def step_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    if _active:
        raise RuntimeError("a forward context is already active")
    _active.append(ctx)
    try:
        yield ctx
    finally:
        _active.pop()


def current() -> ForwardContext:
    if not _active:
        raise RuntimeError("no forward context: run the model inside step_context()")
    return _active[0]
