"""Sizes and allocates the paged KV cache and hands each attention layer its two tensors."""

from __future__ import annotations

import logging

import torch
from torch import nn

from vlmserve.shared.config import Config
from vlmserve.workers.layers.attention import PagedAttention

log = logging.getLogger("vlmserve.kv_cache")


def attention_layers(model: nn.Module) -> list[PagedAttention]:
    return [m for m in model.modules() if isinstance(m, PagedAttention)]


def block_bytes(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, keys and values, on this rank."""
    per_token = sum(2 * a.num_kv_heads * a.head_dim for a in attention_layers(model))
    return per_token * block_size * dtype.itemsize


def num_blocks_for(
    config: Config, model: nn.Module, dtype: torch.dtype, device: torch.device, session_len: int
) -> int:
    """--num-kv-blocks if given; else a fraction of free device memory (cpu: of a budget)."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = free * config.cache_max_entry_count
    else:
        budget = config.cpu_cache_gib * 2**30 * config.cache_max_entry_count
    blocks = int(budget // block_bytes(model, config.block_size, dtype))
    if device.type == "cpu":
        # Host memory is not reserved for us alone: take no more than a full batch of
        # full-length sequences could ever use (session length is at most this).
        blocks = min(blocks, config.max_batch_size * -(-session_len // config.block_size))
    if blocks < 1:
        raise MemoryError(
            "no room for a single KV cache block; lower the model size or raise the budget"
        )
    return blocks


def allocate_kv_cache(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> None:
    """One tensor for the whole cache, viewed per layer as [kv_heads, slots, head_dim]."""
    layers = attention_layers(model)
    first = layers[0]
    shape = (len(layers), 2, first.num_kv_heads, num_blocks * block_size, first.head_dim)
    cache = torch.zeros(shape, dtype=dtype, device=device)
    for index, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = cache[index, 0], cache[index, 1]
        layer.block_size = block_size
    log.info(
        "KV cache: %d blocks of %d tokens, %.1f MiB",
        num_blocks, block_size, cache.numel() * dtype.itemsize / 2**20,
    )  # fmt: skip
