"""How many CPU threads each step runs on: all of the worker's, or one for a step too small
to share.

A parallel region costs its threads a wake-up, and after it libgomp's threads spin for their
next one (~8 ms on this machine's AMD EPYC: GOMP_SPINCOUNT's 300,000 pauses). A step whose
GEMMs are tiny is mostly Python between ops, so its second thread spends the step spinning:
a core taken from the frontends and the scheduler on the same box, for GEMMs that two threads
run no faster (15-18 us a call either way below ~0.25 M multiply-adds, square packed GEMMs on
this 2-core machine). Serving the benchmark's tiny LLaVA (2 layers of 64) with one image per
chat at c=16, the worker took 3.5 s of CPU per 64 requests on 2 threads and 1.0 s on one, and
the server answered 1.35x faster. A step of the q30m (30 M multiply-adds per token) stays on
all threads at every batch: served at c=1 with its 1-6 token steps on one thread, it answered
15 % slower (51 against 61 tok/s).

oneDNN builds its GEMM kernels for the thread count they run on, so `warm` builds the
one-thread kernels of every small step's row count too (workers/layers/linear.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vlmserve.workers.layers.linear import warm_gemms

# Below this many multiply-adds in its GEMMs, a step runs on one thread (a few tens of us of
# GEMM work a thread, less than the step's Python around it).
SMALL_STEP_MACS = 8_000_000


def macs_per_token(model: nn.Module) -> int:
    """Multiply-adds per token in the decoder's own GEMMs on this rank (its layers that pack:
    projections and the LM head; the vision tower runs per image, not per token)."""
    return sum(m.weight.numel() for m in model.modules() if hasattr(m, "pack"))


class StepThreads:
    """The worker's thread count per step (CPU only; a GPU worker's is left alone)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.full = torch.get_num_threads()  # what OMP_NUM_THREADS or the TP split gave
        per_token = max(1, macs_per_token(model))
        shares = device.type == "cpu" and self.full > 1
        # A step of at most this many tokens runs on one thread.
        self.small_tokens = SMALL_STEP_MACS // per_token if shares else 0

    def set_for(self, tokens: int) -> None:
        """Use one thread for a step of `tokens` tokens if it is small, else all of them."""
        self._use(1 if tokens <= self.small_tokens else self.full)

    def _use(self, threads: int) -> None:
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    @contextlib.contextmanager
    def single(self) -> Iterator[None]:
        before = torch.get_num_threads()
        self._use(1)
        try:
            yield
        finally:
            self._use(before)

    def warm(self, model: nn.Module, max_logit_rows: int) -> int:
        """Build the one-thread GEMM kernels of the small steps' row counts; how many."""
        if self.small_tokens < 1:
            return 0
        with self.single():
            return warm_gemms(model, self.small_tokens, min(self.small_tokens, max_logit_rows))
