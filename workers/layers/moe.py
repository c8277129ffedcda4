"""A sparse mixture-of-experts MLP (Qwen3-MoE / Qwen3-VL-MoE): a softmax router picks each
token's top-k experts, their weights renormalized to sum to one; each expert is a SiLU-gated
MLP; a token's output is the weighted sum of its experts' outputs.

Plain torch, correct first: the tokens routed to each expert are gathered, run through that
expert's two matmuls and added back with `index_add_`, experts in ascending order, as
transformers' reference loop does. Tensor parallelism shards every expert's intermediate
dimension across ranks (the router is replicated): each rank sums its partial outputs and the
all-reduce adds the ranks', as RowParallelLinear does.

Expert weights are fused across experts, as Qwen3-VL-MoE checkpoints store them:
`experts.gate_up_proj` [experts, 2 * intermediate, hidden] (gate rows, then up rows) and
`experts.down_proj` [experts, hidden, intermediate], which is what transformers 5 saves; the
hub's checkpoints hold both transposed ([experts, hidden, 2 * intermediate] and [experts,
intermediate, hidden]), and transformers transposes a tensor whose shape is not its
parameter's. So does the loader here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.workers.parallel import all_reduce, divide, tp_rank, tp_size


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.shard = divide(intermediate, tp_size())  # this rank's part of each expert
        self.gate = nn.Linear(hidden, num_experts, bias=False)  # the router, whole on every rank
        self.gate.weight.requires_grad_(False)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * self.shard, hidden), requires_grad=False
        )
        self.experts.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden, self.shard), requires_grad=False
        )
        self.experts.gate_up_proj.weight_loader = self.load_gate_up
        self.experts.down_proj.weight_loader = self.load_down

    def load_gate_up(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        experts, hidden = param.shape[0], param.shape[2]
        shape = tuple(loaded.get_shape() if hasattr(loaded, "get_shape") else loaded.shape)
        start, size, full = tp_rank() * self.shard, self.shard, self.intermediate
        if shape == (experts, 2 * full, hidden):  # transformers' layout
            parts = (loaded[:, start : start + size], loaded[:, full + start : full + start + size])
        elif shape == (experts, hidden, 2 * full):  # the hub's, transposed
            parts = tuple(
                loaded[:, :, at : at + size].transpose(1, 2) for at in (start, full + start)
            )
        else:
            raise ValueError(f"experts.gate_up_proj of shape {shape} for {experts} experts")
        with torch.no_grad():
            param.copy_(torch.cat(parts, dim=1))

    def load_down(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        experts, hidden = param.shape[0], param.shape[1]
        shape = tuple(loaded.get_shape() if hasattr(loaded, "get_shape") else loaded.shape)
        start, size, full = tp_rank() * self.shard, self.shard, self.intermediate
        if shape == (experts, hidden, full):  # transformers' layout
            part = loaded[:, :, start : start + size]
        elif shape == (experts, full, hidden):  # the hub's, transposed
            part = loaded[:, start : start + size].transpose(1, 2)
        else:
            raise ValueError(f"experts.down_proj of shape {shape} for {experts} experts")
        with torch.no_grad():
            param.copy_(part)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts [tokens, k] and their weights [tokens, k] (summing to 1)."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)  # [tokens, experts]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        return experts, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts, weights = self.route(x)  # [tokens, k] each
        out = torch.zeros_like(x)  # [tokens, hidden]
        for e in experts.unique().tolist():  # ascending
            tokens, slot = torch.where(experts == e)
            gate, up = F.linear(x[tokens], self.experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.experts.down_proj[e])  # [routed, hidden]
            out.index_add_(0, tokens, y * weights[tokens, slot, None])
        return all_reduce(out)
