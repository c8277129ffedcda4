"""Linear layers for tensor parallelism: column-parallel projections merged into one matmul
(gate and up; q, k and v) and row-parallel ones.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this
rank's slice of a checkpoint tensor. `loaded` is a torch tensor or a safetensors slice
(both index the same way), so a rank reads only the rows or columns it keeps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.workers.parallel import all_reduce, divide, shard_heads, tp_rank, tp_size


def read_rows(loaded: Any, start: int, size: int) -> torch.Tensor:
    return loaded[start : start + size]


def read_cols(loaded: Any, start: int, size: int) -> torch.Tensor:
    return loaded[:, start : start + size]


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    if param.shape != value.shape:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(value.shape)} for {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(value)


def load_whole(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    copy_into(param, loaded[:])


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        load_whole(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of one input in one matmul (gate and up)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        self.shard_sizes = [divide(size, tp_size()) for size in output_sizes]
        super().__init__(in_features, sum(self.shard_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        size = self.shard_sizes[shard_id]
        offset = sum(self.shard_sizes[:shard_id])
        copy_into(param[offset : offset + size], read_rows(loaded, tp_rank() * size, size))


class QKVParallelLinear(LinearBase):
    """Query, key and value projections in one matmul, heads split across ranks.

    The split is `shard_heads`'s: head counts need not divide by the tensor-parallel size,
    and with fewer KV heads than ranks each KV head is replicated on several ranks.
    `out_shard` is this rank's (start, size) of the attention output's features, which
    the row-parallel o_proj must take as its input slice.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        shard = shard_heads(num_heads, num_kv_heads, tp_size(), tp_rank())
        self.head_dim = head_dim
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.q_start = shard.q_start * head_dim
        self.kv_start = shard.kv_start * head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.out_shard = (self.q_start, self.q_size)
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.q_start
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, start = self.kv_size, self.kv_start
        copy_into(param[offset : offset + size], read_rows(loaded, start, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the partial outputs are summed by all-reduce.

    The split is even unless `shard` gives this rank's (start, size) of the input, as an
    attention output projection does when heads split unevenly (QKVParallelLinear.out_shard).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if shard is None:
            size = divide(in_features, tp_size())
            shard = (tp_rank() * size, size)
        self.input_start = shard[0]
        super().__init__(shard[1], out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:  # the bias is whole on every rank, added once after the sum
            load_whole(param, loaded)
            return
        copy_into(param, read_cols(loaded, self.input_start, param.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
