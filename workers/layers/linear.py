"""Linear layers for tensor parallelism: column-parallel projections merged into one matmul
(gate and up; q, k and v) and row-parallel ones.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this
rank's slice of a checkpoint tensor. `loaded` is a torch tensor or a safetensors slice
(both index the same way), so a rank reads only the rows or columns it keeps.

On CPU the matmuls go through oneDNN with the weight prepacked once after loading
(`pack_linears`, `--cpu-gemm onednn`): `F.linear` there is MKL's sgemm, which on AMD CPUs runs
1.5-3x slower for these shapes (bench/ceiling.py prints both). The parameter itself stays as
loaded (a tied embedding reads it; `--cpu-gemm aten` and CUDA use it through `F.linear`).

oneDNN keeps what it builds for each input shape: ideep's cache of inner products (capacity
`LRU_CACHE_CAPACITY`, 1024 by default) and oneDNN's own primitive cache (1024), each entry
holding its JIT-compiled kernels, ~300-600 KiB per (rows, weight) pair measured here. A step's
row count (its token count) is new on nearly every step under a mixed load, so a worker's RSS
grew by that much per new count until both caches filled (a GB and more for the q30m). `linear`
therefore runs oneDNN on a bounded set of row counts (`gemm_rows`), padding the input, and
`warm_gemms` builds them all for the decoder before the first request (~1 s and ~200-290 MB
for the q30m or a tiny test model), so the worker's memory is flat under load; the vision
towers' nn.Linear layers, whose rows are image patches, are bounded alike but not warmed.
Emptying the caches instead (both capacities 0) costs ~1.4 ms per call in rebuilding.
"""

from __future__ import annotations

from collections import Counter
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


CPU_GEMMS = ("onednn", "aten")
# The batch size oneDNN picks the packed layout for; any batch runs on it. Hints 8, 32 and 128
# measured alike for M = 1..512 on the q30m shapes (2 threads, AVX-512), all 1.2-2x faster than
# the unpacked oneDNN call and 2-4x faster than F.linear from M = 8 up.
PACK_BATCH_HINT = 32


def onednn_packs(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack `weight` here: CPU, float32 (or bfloat16 where the CPU has it)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack_weight(weight: torch.Tensor, cpu_gemm: str) -> torch.Tensor | None:
    """oneDNN's prepacked copy of `weight` [out, in] for `linear`, or None where `F.linear` runs
    (`cpu_gemm` "aten", CUDA, a dtype oneDNN does not take)."""
    if cpu_gemm not in CPU_GEMMS:
        raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, not {cpu_gemm!r}")
    if cpu_gemm == "aten" or not onednn_packs(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)


# Row counts up to this run as they are: padding 1 row to 8 doubles a decode GEMM's time.
EXACT_ROWS = 16


def gemm_rows(rows: int) -> int:
    """The row count oneDNN computes `rows` rows with: `rows` up to EXACT_ROWS, above it `rows`
    rounded up to one of 8 counts per power of two (at most 1/8 more rows), so a server sees
    ~16 + 8 * log2(most rows / 16) shapes per weight whatever its load (72 up to 2048 rows)."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)  # rows in [2^k, 2^(k+1)): step 2^(k-3)
    return -(-rows // step) * step


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    """x @ weight.T + bias, through `packed` (pack_weight's) when there is one."""
    if packed is None:
        return F.linear(x, weight, bias)
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    padded = gemm_rows(rows)
    if padded == rows:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    # Not F.pad: it fills the whole output and then copies the input over it.
    x2 = x.new_empty(padded, features)  # [padded, in]
    x2[:rows].copy_(x.reshape(rows, features))
    x2[rows:].zero_()
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")[:rows]
    return y.reshape(*x.shape[:-1], y.shape[-1])  # [..., out]


def warm_gemms(model: nn.Module, max_rows: int, max_logit_rows: int) -> int:
    """Run each distinct packed GEMM of `model` once per row count `linear` hands oneDNN for 1 to
    `max_rows` rows (a step's token budget; the LM head, which takes the rows it samples or
    scores: 1 to `max_logit_rows`), so that oneDNN builds and caches every kernel the worker will
    run now, not a few hundred KiB at a time on steps of a size not seen before. Layers of one
    shape share their kernels: one of them runs. Returns how many GEMMs were built."""
    counts = {top: sorted({gemm_rows(m) for m in range(1, top + 1)})
              for top in (max_rows, max_logit_rows)}  # fmt: skip
    built: set[tuple] = set()
    with torch.inference_mode():
        for module in model.modules():
            packed = getattr(module, "packed", None)
            if packed is None:
                continue
            # The row-parallel layer adds its bias after the all-reduce: its GEMM has none.
            bias = None if isinstance(module, RowParallelLinear) else getattr(module, "bias", None)
            top = max_logit_rows if hasattr(module, "compute_logits") else max_rows
            weight = module.weight
            for rows in counts[top]:
                key = (tuple(weight.shape), weight.dtype, bias is not None, rows)
                if key not in built:
                    built.add(key)
                    linear(weight.new_zeros(rows, weight.shape[1]), weight, bias, packed)
    return len(built)


def pack_linears(model: nn.Module, cpu_gemm: str) -> int:
    """Pack the weight of every linear layer of `model` once its weights are loaded (packing
    copies them): ours (`pack`) and transformers' plain nn.Linear ones (vision towers,
    projectors). The loaded copy of a packed weight is then released (`release_weight`) unless
    another module shares the parameter (a tied LM head's is the embedding table): without
    that, a CPU worker held every GEMM weight twice. Returns how many layers run packed."""
    shared = shared_parameters(model)
    count = 0
    for module in model.modules():
        if hasattr(module, "pack"):
            packed = module.pack(cpu_gemm)
        elif type(module) is nn.Linear:
            packed = pack_nn_linear(module, cpu_gemm)
        else:
            continue
        if packed and id(module.weight) not in shared:
            release_weight(module.weight)
        count += packed
    return count


def shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (tied weights)."""
    holders = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {param for param, count in holders.items() if count > 1}


def release_weight(param: nn.Parameter) -> None:
    """Drop a packed layer's loaded values: `linear` reads only the packed copy. The parameter
    keeps its shape, dtype and device (warm_gemms and transformers' vision code read them)
    over one NaN broadcast to that shape, so a stray read of the values computes NaN, which
    the parity tests would show, rather than plausible numbers."""
    param.data = torch.full((), float("nan"), dtype=param.dtype, device=param.device).expand(
        param.shape
    )


def pack_nn_linear(module: nn.Linear, cpu_gemm: str) -> bool:
    """Have a transformers nn.Linear run on a packed copy of its weight (its forward swapped,
    its parameters kept); False, and its own forward back, where F.linear stays."""
    packed = pack_weight(module.weight, cpu_gemm)
    if packed is None:
        module.__dict__.pop("forward", None)
        return False

    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear(x, module.weight, module.bias, packed)

    module.forward = forward
    return True


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
        self.packed: torch.Tensor | None = None  # oneDNN's copy of the weight (pack)

    def pack(self, cpu_gemm: str) -> bool:
        """Run on a packed copy of the weight as now loaded; False where F.linear stays."""
        self.packed = pack_weight(self.weight, cpu_gemm)
        return self.packed is not None

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        load_whole(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


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
        y = all_reduce(linear(x, self.weight, None, self.packed))
        return y if self.bias is None else y + self.bias
