"""The paged KV cache: one object that sizes it, owns its tensor and its layout.

Layout: one tensor [layers, 2, kv_heads, slots, head_dim], a slot being
block_id * block_size + offset. Heads come first so that gathering a batch's slots gives
each head's keys contiguous, ready for a matmul without another copy; a block of one head
is one contiguous run of block_size * head_dim values, so whole blocks gather at once.
Attention layers do not hold the cache: the step's backend asks the pool by layer index.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vlmserve.shared.config import Config
from vlmserve.workers.attention import cpu_paged
from vlmserve.workers.layers.attention import PagedAttention

log = logging.getLogger("vlmserve.kv_pool")


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, 2, num_kv_heads, num_blocks * block_size, head_dim)
        self.cache = torch.empty(shape, dtype=dtype, device=device)
        cpu_paged.advise_huge_pages(self.cache)  # before the first touch: zero_ faults them in
        self.cache.zero_()
        # Views made once: a layer's lookup is a list index, not tensor indexing.
        self._kv = [(self.cache[i, 0], self.cache[i, 1]) for i in range(num_layers)]
        per_block = (num_kv_heads, num_blocks, block_size * head_dim)
        self._blocks = [(k.view(per_block), v.view(per_block)) for k, v in self._kv]

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVPool:
        """A pool with room for every attention layer of `model`, numbered 0..layers-1."""
        layers = attention_layers(model)
        if [layer.layer_idx for layer in layers] != list(range(len(layers))):
            raise ValueError("attention layers must be numbered 0, 1, ... in model order")
        first = layers[0]
        pool = cls(
            len(layers), first.num_kv_heads, first.head_dim, num_blocks, block_size, dtype, device
        )
        log.info(
            "KV cache: %d blocks of %d tokens, %.1f MiB",
            num_blocks, block_size, pool.cache.numel() * dtype.itemsize / 2**20,
        )  # fmt: skip
        return pool

    def kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer: [kv_heads, slots, head_dim] each."""
        return self._kv[layer_idx]

    def blocks(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same memory by block: [kv_heads, num_blocks, block_size * head_dim] each."""
        return self._blocks[layer_idx]

    def store(
        self, layer_idx: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write new keys and values ([tokens, kv_heads, head_dim]) at their slots."""
        k_cache, v_cache = self._kv[layer_idx]
        k_cache.index_copy_(1, slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, slot_mapping, v.transpose(0, 1))


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
