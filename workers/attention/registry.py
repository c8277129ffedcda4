"""Attention backends by the name --attention-backend gives them."""

from __future__ import annotations

from vlmserve.workers.attention.backend import AttentionBackend
from vlmserve.workers.attention.sdpa_backend import SdpaBackend, SdpaGatherBackend
from vlmserve.workers.attention.torch_backend import TorchBackend

BACKENDS: dict[str, type[AttentionBackend]] = {
    backend.name: backend for backend in (TorchBackend, SdpaBackend, SdpaGatherBackend)
}


def attention_backend(name: str) -> type[AttentionBackend]:
    """The backend class called `name`; an unknown name is refused with the list."""
    if name not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(sorted(BACKENDS))}"
        )
    return BACKENDS[name]
