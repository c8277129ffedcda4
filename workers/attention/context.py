"""The attention state of one forward pass, set for exactly that step.

Layers read it with `current()` instead of threading it through every signature; a
`with step_context(metadata, backend):` block prepares the backend for the step (once, not
once per layer), sets it, and refuses nesting, so it is never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmserve.workers.attention.backend import AttentionBackend
    from vlmserve.workers.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class ForwardContext:
    metadata: AttentionMetadata
    backend: AttentionBackend


_active: list[ForwardContext] = []


@contextmanager
def step_context(
    metadata: AttentionMetadata, backend: AttentionBackend
) -> Iterator[ForwardContext]:
    if _active:
        raise RuntimeError("a forward context is already active")
    backend.prepare(metadata)
    ctx = ForwardContext(metadata, backend)
    _active.append(ctx)
    try:
        yield ctx
    finally:
        _active.pop()


def current() -> ForwardContext:
    if not _active:
        raise RuntimeError("no forward context: run the model inside step_context()")
    return _active[0]
