"""Same-day ceilings of this machine for the serving workload: how fast a lean float32 forward
of the benchmark model runs when it does nothing a serving engine could avoid.

    .venv/bin/python bench/ceiling.py [--batches 1,8,32] [--context 424] [--prompt-len 360]

- lean decode step: one token per sequence through every layer — RMSNorm, the QKV, output,
  gate-up and down GEMMs, SiLU-and-multiply, attention over a preallocated cache filled to
  `--context`, each sequence's keys contiguous — then the final norm and the LM head. No
  rotary, sampling or bookkeeping: a bound, not an engine. Attention runs the fastest code
  this machine has: the engine's C kernels (workers/attention/cpu_paged.py, here reading one
  contiguous block per sequence) when they build, else torch's fused SDPA (4-D, GQA);
- the same step's GEMMs alone (a decode's floor once attention costs nothing);
- a lean prefill of one `--prompt-len`-token prompt (causal, the same attention choice, LM
  head on its last row);
- a 2048^3 float32 GEMM's GFLOP/s (the machine's dense rate today).

Each figure is the fastest of `--repeats` calls after a warm-up, measured with both CPU GEMM
kernels the engine has (`--cpu-gemm`: aten's F.linear and oneDNN on prepacked weights, see
workers/layers/linear.py); the ceiling is the faster of the two, and both are printed.

From those, the workload limit at concurrency c (2c requests of `--prompt-len` prompt and
`--output-len` output tokens, as bench/serve_bench.py sends them): every prompt prefilled
once, then output_len - 1 decode steps per wave of c: output tokens / (prefills + decodes).
Shapes come from the checkpoint's config.json (default: the benchmark's q30m).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmserve.workers.attention import cpu_paged
from vlmserve.workers.layers.linear import CPU_GEMMS, linear, pack_weight

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float = 1e-6

    @classmethod
    def from_config(cls, path: str) -> Shape:
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        c = c.get("text_config", c)
        heads = c["num_attention_heads"]
        return cls(
            hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
            kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate=c["intermediate_size"], vocab=c["vocab_size"],
            eps=c.get("rms_norm_eps", 1e-6),
        )  # fmt: skip


# The benchmark's q30m (vlmserve demo-checkpoint --size bench).
Q30M = Shape(hidden=512, layers=12, heads=8, kv_heads=2, head_dim=64, intermediate=1024, vocab=4096)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Seconds of the fastest call: a ceiling is what the machine does when nothing else
    interrupts it (on a shared machine the median measures the neighbours)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


class LeanModel:
    """Random float32 weights of `shape` and a KV cache preallocated for `batch` x `max_len`;
    every forward takes the GEMM kernel to run (`kernel`, one of CPU_GEMMS)."""

    GEMMS = ("qkv", "o", "gate_up", "down")

    def __init__(self, shape: Shape, batch: int, max_len: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        s = shape
        self.s = s

        def w(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=g) * 0.02

        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        self.layers = [
            {
                "in_norm": torch.ones(s.hidden),
                "post_norm": torch.ones(s.hidden),
                "qkv": w(q + 2 * kv, s.hidden),
                "qkv_bias": w(q + 2 * kv),
                "o": w(s.hidden, q),
                "gate_up": w(2 * s.intermediate, s.hidden),
                "down": w(s.hidden, s.intermediate),
            }  # fmt: skip
            for _ in range(s.layers)
        ]
        self.norm = torch.ones(s.hidden)
        self.lm_head = w(s.vocab, s.hidden)
        # Each kernel's packed copy of every weight (None: F.linear on the weight itself).
        self.packed = {
            kernel: [{name: pack_weight(layer[name], kernel) for name in self.GEMMS} for layer in
                     self.layers] + [{"lm_head": pack_weight(self.lm_head, kernel)}]
            for kernel in CPU_GEMMS
        }  # fmt: skip
        # [layers, kv_heads, batch * max_len, head_dim]: sequence i's keys are slots
        # [i * max_len, (i + 1) * max_len), one block of max_len for the C kernels; random, so
        # no kernel skips zeros.
        self.max_len = max_len
        cache = (s.layers, s.kv_heads, batch * max_len, s.head_dim)
        self.k = torch.randn(cache, generator=g)
        self.v = torch.randn(cache, generator=g)
        self.kernels = cpu_paged.kernel()  # None: torch's SDPA
        self.attention = "cpu_paged C kernels" if self.kernels else "torch SDPA"
        self.tables = torch.arange(batch, dtype=torch.int32)[:, None]  # [batch, 1]

    def seq_cache(self, i: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values of the first b sequences, [b, kv_heads, max_len, dim]."""
        s = self.s
        shape = (s.kv_heads, self.k.shape[2] // self.max_len, self.max_len, s.head_dim)
        k, v = self.k[i].view(shape), self.v[i].view(shape)
        return k[:, :b].transpose(0, 1), v[:, :b].transpose(0, 1)

    def attend(self, i: int, q: torch.Tensor, length: int, new: int) -> torch.Tensor:
        """Attention of q [b * new, heads, dim] (the last `new` positions of b sequences of
        `length` keys, causal) over layer i's cache; [b * new, heads * dim]."""
        s = self.s
        b = q.shape[0] // new
        out = torch.empty(q.shape[0], s.heads, s.head_dim)
        if self.kernels is not None:
            args = (q, out, self.k[i], self.v[i], self.max_len, None, s.head_dim**-0.5)
            lens = torch.full((b,), length, dtype=torch.int32)
            if new == 1:
                decodes = cpu_paged.PagedDecodes(b, self.tables[:b], lens)
                cpu_paged.attend(self.kernels, decodes, *args)
            else:
                starts = torch.arange(0, (b + 1) * new, new, dtype=torch.int32)
                seqs = torch.arange(b, dtype=torch.int32)
                prefills = cpu_paged.PagedPrefills(seqs, starts, lens, self.tables[:b])
                cpu_paged.attend_prefills(self.kernels, prefills, *args)
            return out.view(q.shape[0], -1)
        k, v = self.seq_cache(i, b)
        attn = F.scaled_dot_product_attention(
            q.view(b, new, s.heads, s.head_dim).transpose(1, 2), k[:, :, :length],
            v[:, :, :length], is_causal=new > 1, enable_gqa=True,
        )  # [b, heads, new, head_dim]  # fmt: skip
        return attn.transpose(1, 2).reshape(q.shape[0], -1)

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.s.eps)

    def mm(self, x: torch.Tensor, i: int, name: str, kernel: str) -> torch.Tensor:
        """x @ weight.T of layer i's `name` (the LM head: i = -1) with `kernel`."""
        weights = self.layers[i] if i >= 0 else {"lm_head": self.lm_head}
        bias = weights.get("qkv_bias") if name == "qkv" else None
        return linear(x, weights[name], bias, self.packed[kernel][i][name])

    def _mlp(self, x: torch.Tensor, i: int, kernel: str) -> torch.Tensor:
        gate, up = self.mm(x, i, "gate_up", kernel).chunk(2, dim=-1)
        return self.mm(F.silu(gate) * up, i, "down", kernel)

    @torch.inference_mode()
    def decode(
        self, x: torch.Tensor, pos: int, attention: bool = True, kernel: str = "onednn"
    ) -> torch.Tensor:
        """One token per sequence: x [batch, hidden] at position `pos` of every sequence."""
        s = self.s
        b = x.shape[0]
        q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
        for i, layer in enumerate(self.layers):
            h = self.rms(x, layer["in_norm"])
            qkv = self.mm(h, i, "qkv", kernel)  # [batch, q + 2 kv]
            if attention:
                q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
                keys, values = self.seq_cache(i, b)
                keys[:, :, pos] = k.view(b, s.kv_heads, s.head_dim)
                values[:, :, pos] = v.view(b, s.kv_heads, s.head_dim)
                attn = self.attend(i, q.view(b, s.heads, s.head_dim), pos + 1, 1)
            else:
                attn = qkv[:, :q_size]
            x = x + self.mm(attn, i, "o", kernel)
            x = x + self._mlp(self.rms(x, layer["post_norm"]), i, kernel)
        return self.mm(self.rms(x, self.norm), -1, "lm_head", kernel)  # [batch, vocab]

    @torch.inference_mode()
    def prefill(self, x: torch.Tensor, kernel: str = "onednn") -> torch.Tensor:
        """One prompt of x [tokens, hidden], causal attention, logits of its last token."""
        s = self.s
        n = x.shape[0]
        q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
        for i, layer in enumerate(self.layers):
            qkv = self.mm(self.rms(x, layer["in_norm"]), i, "qkv", kernel)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            keys, values = self.seq_cache(i, 1)
            keys[0, :, :n] = k.view(n, s.kv_heads, s.head_dim).transpose(0, 1)
            values[0, :, :n] = v.view(n, s.kv_heads, s.head_dim).transpose(0, 1)
            attn = self.attend(i, q.view(n, s.heads, s.head_dim), n, n)
            x = x + self.mm(attn, i, "o", kernel)
            x = x + self._mlp(self.rms(x, layer["post_norm"]), i, kernel)
        return self.mm(self.rms(x[-1:], self.norm), -1, "lm_head", kernel)


def gemm_gflops(kernel: str, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    packed = pack_weight(b, kernel)  # a @ b.T, as a linear layer computes
    return 2 * n**3 / timed(lambda: linear(a, b, None, packed), repeats) / 1e9


def measure(
    shape: Shape, batches: list[int], context: int, prompt_len: int, output_len: int,
    repeats: int = 20, progress: Callable[[str], None] = print,
) -> dict:  # fmt: skip
    """Every figure of the module docstring, as a JSON-able dict."""
    max_len = max(context, prompt_len) + 1
    model = LeanModel(shape, max(batches), max_len)
    by_kernel = {}
    for kernel in CPU_GEMMS:
        decode, gemms = {}, {}
        for b in batches:
            progress(f"ceiling ({kernel}): lean decode step at batch {b} ...")
            x = torch.randn(b, shape.hidden)
            decode[b] = b / timed(lambda x=x, k=kernel: model.decode(x, context, kernel=k), repeats)
            gemms[b] = b / timed(
                lambda x=x, k=kernel: model.decode(x, context, attention=False, kernel=k), repeats
            )
        progress(f"ceiling ({kernel}): lean prefill of {prompt_len} tokens ...")
        prompt = torch.randn(prompt_len, shape.hidden)
        prefill_s = timed(lambda p=prompt, k=kernel: model.prefill(p, k), max(3, repeats // 4))
        progress(f"ceiling ({kernel}): 2048^3 GEMM ...")
        by_kernel[kernel] = {
            "decode_tok_s": decode, "gemms_only_tok_s": gemms, "prefill_s": prefill_s,
            "gemm_2048_gflops": gemm_gflops(kernel),
        }  # fmt: skip
    # The machine's limit is what its fastest kernel does, figure by figure.
    runs = by_kernel.values()
    decode = {b: max(r["decode_tok_s"][b] for r in runs) for b in batches}
    gemms = {b: max(r["gemms_only_tok_s"][b] for r in runs) for b in batches}
    prefill_s = min(r["prefill_s"] for r in runs)
    gflops = max(r["gemm_2048_gflops"] for r in runs)
    limit = {}
    for c in batches:
        # 2c requests in two waves of c: 2c prefills, 2 x (output_len - 1) decode steps.
        seconds = 2 * c * prefill_s + 2 * (output_len - 1) * c / decode[c]
        limit[c] = 2 * c * output_len / seconds
    return {
        "shape": shape.__dict__, "attention": model.attention, "context": context,
        "prompt_len": prompt_len,
        "output_len": output_len, "torch_threads": torch.get_num_threads(),
        "decode_tok_s": decode, "gemms_only_tok_s": gemms, "prefill_s": prefill_s,
        "prefill_tok_s": prompt_len / prefill_s, "gemm_2048_gflops": gflops,
        "workload_limit_tok_s": limit, "by_kernel": by_kernel, "load_avg_1m": os.getloadavg()[0],
    }  # fmt: skip


def print_report(r: dict) -> None:
    print(f"\nceilings (float32, {r['torch_threads']} torch threads, attention: "
          f"{r.get('attention', 'torch SDPA')}, decode at context {r['context']}, load average "
          f"{r['load_avg_1m']:.2f}):")  # fmt: skip
    print(f"| {'batch':>5} | {'lean decode tok/s':>17} | {'GEMMs only tok/s':>16} | "
          f"{'workload limit tok/s':>20} |")  # fmt: skip
    print(f"|{'-' * 7}|{'-' * 19}|{'-' * 18}|{'-' * 22}|")
    for b, tok_s in r["decode_tok_s"].items():
        print(f"| {b:>5} | {tok_s:17.1f} | {r['gemms_only_tok_s'][b]:16.1f} | "
              f"{r['workload_limit_tok_s'][b]:20.1f} |")  # fmt: skip
    print(
        f"lean prefill of {r['prompt_len']} tokens: {r['prefill_s'] * 1000:.1f} ms "
        f"({r['prefill_tok_s']:.0f} tok/s); 2048^3 GEMM: {r['gemm_2048_gflops']:.1f} GFLOP/s"
    )
    print("workload limit: 2c requests, each prefilled once, then decoded at batch c")
    by_kernel = r.get("by_kernel", {})
    if by_kernel:
        print("\nby GEMM kernel (the figures above are the faster of the two, figure by figure):")
        print(f"| {'kernel':>7} | {'batch':>5} | {'lean decode tok/s':>17} | "
              f"{'GEMMs only tok/s':>16} | {'prefill ms':>10} | "
              f"{'2048^3 GFLOP/s':>14} |")  # fmt: skip
        print(f"|{'-' * 9}|{'-' * 7}|{'-' * 19}|{'-' * 18}|{'-' * 12}|{'-' * 16}|")
        for kernel, k in by_kernel.items():
            for b, tok_s in k["decode_tok_s"].items():
                print(f"| {kernel:>7} | {b:>5} | {tok_s:17.1f} | "
                      f"{k['gemms_only_tok_s'][b]:16.1f} | {k['prefill_s'] * 1000:10.1f} | "
                      f"{k['gemm_2048_gflops']:14.1f} |")  # fmt: skip


def main() -> None:
    from report import write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint dir for the shape (q30m)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=424, help="decode position (360 + 64)")
    parser.add_argument("--prompt-len", type=int, default=360)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "ceiling.json"))
    args = parser.parse_args()
    shape = Shape.from_config(args.model) if args.model else Q30M
    batches = [int(b) for b in args.batches.split(",")]
    report = measure(shape, batches, args.context, args.prompt_len, args.output_len, args.repeats)
    print_report(report)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
