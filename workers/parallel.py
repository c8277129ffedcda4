"""The tensor-parallel group: joining and leaving it, queries, collectives, head splits.

Every worker process is one rank. Ranks meet through a store: on one host a FileStore in
--ipc-dir, found through a pointer file that rank 0 keeps locked while it lives (so a file
left by a killed run with the same --run-id is never mistaken for this run's); across
hosts a TCPStore that rank 0 serves on --master-addr:--master-port. The backend is gloo on
CPU and NCCL on CUDA. Queries and collectives are trivial when no group was joined.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from vlmserve.shared.config import Config

log = logging.getLogger("vlmserve.parallel")

POLL_S = 0.05


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class CollectiveFailed(RuntimeError):
    """A collective did not complete: another rank died, hung past --dist-timeout, or broke."""


@contextlib.contextmanager
def _collective(name: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:  # gloo and NCCL raise RuntimeError or its DistError kinds
        raise CollectiveFailed(
            f"tensor-parallel {name} failed, most likely because another rank died: {exc}"
        ) from exc


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        with _collective("all-reduce"):
            dist.all_reduce(x)
    return x


def gather_to_first(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` in rank order, on rank 0 only (the rank that
    samples); the other ranks get their own `x` back. Half the traffic of an all-gather at
    two ranks, and no rank but 0 holds the whole vocabulary's logits."""
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())] if tp_rank() == 0 else None
    with _collective("gather"):
        dist.gather(x.contiguous(), parts, dst=0)
    return torch.cat(parts, dim=dim) if parts is not None else x


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor-parallel size {denominator}")
    return numerator // denominator


# ---- splitting attention heads ----


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, size) of part `index` when `total` items are cut into `parts` contiguous runs
    whose sizes differ by at most one, the larger ones first."""
    base, extra = divmod(total, parts)
    return index * base + min(index, extra), base + (index < extra)


@dataclass(frozen=True)
class HeadShard:
    """The query heads and KV heads one rank computes (global head indices)."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def shard_heads(num_heads: int, num_kv_heads: int, size: int, rank: int) -> HeadShard:
    """Which heads rank `rank` of `size` computes; head counts need not divide by `size`.

    A query head stays on the rank of the KV head it attends to (its GQA group), so each
    rank's attention is ordinary GQA over its own heads. With at least as many KV heads as
    ranks, ranks get whole groups, one more on the first ranks when they don't divide. With
    fewer, each KV head is replicated on a run of consecutive ranks, which split its group
    of query heads between them (again one more on the first ones). The rank's slice of the
    attention output, the input of the row-parallel o_proj, follows its query heads.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} attention heads do not group over {num_kv_heads} KV heads")
    if num_heads < size:
        raise ValueError(
            f"{num_heads} attention heads cannot be split over tensor-parallel size {size}: "
            "every rank needs at least one"
        )
    group = num_heads // num_kv_heads
    if num_kv_heads >= size:
        kv_start, kv_count = split_evenly(num_kv_heads, size, rank)
        return HeadShard(kv_start * group, kv_count * group, kv_start, kv_count)
    for kv_head in range(num_kv_heads):
        first, count = split_evenly(size, num_kv_heads, kv_head)
        if first <= rank < first + count:
            # count <= ceil(size / num_kv_heads) <= group, as num_heads >= size.
            q_offset, q_count = split_evenly(group, count, rank - first)
            return HeadShard(kv_head * group + q_offset, q_count, kv_head, 1)
    raise ValueError(f"rank {rank} is outside tensor-parallel size {size}")


# ---- joining and leaving the group ----


def ranks_per_node(config: Config) -> int:
    return config.tp // config.nnodes


def local_rank(config: Config) -> int:
    """This rank's index on its own machine (ranks are numbered node by node)."""
    return config.rank - config.node_rank * ranks_per_node(config)


def check_placement(config: Config) -> None:
    """Fail at startup when --rank does not belong on --node-rank."""
    per_node = ranks_per_node(config)
    first = config.node_rank * per_node
    if not first <= config.rank < first + per_node:
        raise ValueError(
            f"--rank {config.rank} does not run on --node-rank {config.node_rank}: with --tp "
            f"{config.tp} over --nnodes {config.nnodes}, node {config.node_rank} runs ranks "
            f"{first}..{first + per_node - 1}"
        )


def cpu_threads(config: Config) -> int:
    """Threads for one rank's CPU kernels: this machine's cores shared by its ranks (more
    would have the ranks, which wait for each other in every collective, thrash)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // ranks_per_node(config))


def _locked_by_another(fd: int) -> bool:
    """Whether some other process holds a lock on `fd`'s file (rank 0 does while it lives)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


class Rendezvous:
    """The store the ranks of one server meet through, and how to tell it is still live."""

    def __init__(self, config: Config, deadline: float) -> None:
        self.config = config
        self.pointer_fd: int | None = None  # one host: the pointer file, locked by rank 0
        self.store_path = ""
        if config.master_addr:
            self.where = f"tcp://{config.master_addr}:{config.master_port}"
            # Other ranks retry connecting until rank 0 serves it, or the deadline.
            self.store: dist.Store = dist.TCPStore(
                config.master_addr,
                config.master_port,
                config.tp,
                is_master=config.rank == 0,
                timeout=timedelta(seconds=max(deadline - time.monotonic(), 1.0)),
                wait_for_workers=False,
            )
        else:
            self.pointer = os.path.join(config.ipc_dir, f"vlmserve-{config.run_id}-tp")
            self.where = self.pointer
            if config.rank == 0:
                self._publish()
            else:
                self._find(deadline)
            self.store = dist.FileStore(self.store_path, config.tp)
        self.store.set_timeout(timedelta(seconds=config.dist_timeout))

    def _publish(self) -> None:
        """Rank 0: a fresh store file, named in a pointer file that is locked from birth."""
        for stale in glob.glob(glob.escape(self.pointer) + ".*"):  # earlier runs' files
            with contextlib.suppress(OSError):
                os.remove(stale)
        self.store_path = f"{self.pointer}.{secrets.token_hex(6)}"
        staging = f"{self.pointer}.new"
        fd = os.open(staging, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, self.store_path.encode())
        os.replace(staging, self.pointer)
        self.pointer_fd = fd

    def _find(self, deadline: float) -> None:
        """Other ranks: wait for a pointer that a live rank 0 holds locked; read its store."""
        while True:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(self.pointer, os.O_RDONLY)
                if _locked_by_another(fd):
                    self.store_path = os.read(fd, 4096).decode()
                    self.pointer_fd = fd
                    return
                os.close(fd)  # left by a run whose rank 0 is gone
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"tensor-parallel rank 0 did not open the rendezvous {self.where} within "
                    f"{self.config.dist_timeout:.0f}s; is worker rank 0 running with the same "
                    "--run-id and --ipc-dir?"
                )
            time.sleep(POLL_S)

    def rank0_alive(self) -> bool:
        if self.pointer_fd is None or self.config.rank == 0:
            return True
        return _locked_by_another(self.pointer_fd)

    def join(self, deadline: float) -> None:
        """Announce this rank and wait for all; name the missing ranks when time runs out."""
        config = self.config
        self.store.set(f"vlmserve/joined/{config.rank}", str(os.getpid()))
        keys = {rank: f"vlmserve/joined/{rank}" for rank in range(config.tp)}
        while True:
            missing = [rank for rank, key in keys.items() if not self.store.check([key])]
            if not missing:
                return
            if not self.rank0_alive():
                raise RuntimeError(
                    f"tensor-parallel rank 0 exited before every rank joined {self.where}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"tensor-parallel rank(s) {missing} of {config.tp} did not join "
                    f"{self.where} within {config.dist_timeout:.0f}s"
                )
            time.sleep(POLL_S)

    def close(self) -> None:
        if self.pointer_fd is None:
            return
        if self.config.rank == 0:
            for path in (self.pointer, self.store_path):
                with contextlib.suppress(OSError):
                    os.remove(path)
        os.close(self.pointer_fd)
        self.pointer_fd = None


class TensorParallelGroup:
    """This process's membership in the group; `close()` leaves it."""

    def __init__(self, config: Config, device: torch.device) -> None:
        check_placement(config)
        self.config = config
        backend = "nccl" if device.type == "cuda" else "gloo"
        deadline = time.monotonic() + config.dist_timeout
        self.rendezvous = Rendezvous(config, deadline)
        try:
            self.rendezvous.join(deadline)
            dist.init_process_group(
                backend,
                store=self.rendezvous.store,
                rank=config.rank,
                world_size=config.tp,
                timeout=timedelta(seconds=config.dist_timeout),
                device_id=device if device.type == "cuda" else None,
            )
        except BaseException:
            self.rendezvous.close()
            raise
        log.info(
            "rank %d/%d joined the %s group through %s",
            config.rank, config.tp, backend, self.rendezvous.where,
        )  # fmt: skip

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self.rendezvous.close()


def join_group(config: Config, device: torch.device) -> TensorParallelGroup | None:
    """Join the tensor-parallel group of `config` (None when --tp is 1). On CPU this also
    shares the machine's cores between its ranks, unless OMP_NUM_THREADS says otherwise."""
    if config.tp == 1:
        return None
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads(config))
    return TensorParallelGroup(config, device)
