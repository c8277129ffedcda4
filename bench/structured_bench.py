"""Structured-output benchmark: a JSON-schema workload against the same workload unconstrained,
in one run of one server, and what a repeated schema costs.

    .venv/bin/python bench/structured_bench.py [--num-prompts 64] [--input-len 128]
        [--output-len 128] [--rounds 2] [--out FILE]

Workload (seeded): one-turn chats of random vocabulary (`--input-len` templated tokens), each
streamed from /v1/chat/completions with `--output-len` tokens, greedy, all sent at once. The
constrained requests carry `response_format` with a JSON schema (an array of at least 40 small
objects: integers with bounds, bounded strings, an enum) that cannot be complete before
`--output-len` tokens, so every step of every answer is masked; both modes set `ignore_eos`, so
both write exactly `--output-len` tokens. The modes alternate for `--rounds` rounds (the machine
may be shared: alternating spreads its load over both). Output tokens/s and TTFT per mode.

Compilation: sequential single requests, each with a schema the server has not seen (cold:
the frontend's check and the workers' compile run), then the same schema again (warm: both
cached), then no schema; the TTFTs of the three show what compiling costs and that a repeated
schema costs nothing measurable. Default checkpoint: the engine benchmark's ~30 M-parameter
Qwen2, float32 on CPU. Last, in process: the milliseconds per step the masks of
`--num-prompts` sequences add to the sampler. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile

from engine_bench import bench_checkpoint
from report import write_json
from serve_bench import vlmserve_server
from serve_client import random_prompts, run_load, summarize

HERE = os.path.dirname(os.path.abspath(__file__))


def item_schema(salt: str = "") -> dict:
    """A JSON schema no answer of `--output-len` tokens completes; `salt` renames its keys."""
    item = {
        "type": "object",
        "properties": {
            f"id{salt}": {"type": "integer", "minimum": 0, "maximum": 9999},
            f"name{salt}": {"type": "string", "maxLength": 12},
            f"tag{salt}": {"enum": ["alpha", "beta", "gamma"]},
        },
        "required": [f"id{salt}", f"name{salt}", f"tag{salt}"],
    }
    return {"type": "array", "minItems": 40, "items": item}


def constraint(schema: dict) -> dict:
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    }


def payload(text: str, output_len: int, extra: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": text}], "max_tokens": output_len,
        "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}, **extra,
    }  # fmt: skip


def load(url: str, prompts: list, extra: dict) -> dict:
    bodies = [payload(p.text, p.output_len, extra) for p in prompts]
    outcomes, wall = asyncio.run(run_load(url, bodies, float("inf"), None, 0, lambda _: None))
    return {**summarize(outcomes, wall, prompts), "load_avg_1m": os.getloadavg()[0]}


def ttft(url: str, prompt, extra: dict) -> float:  # noqa: ANN001
    result = load(url, [prompt], extra)
    if result["failed"]:
        raise RuntimeError(f"request failed: {result['errors']}")
    return result["mean_ttft_ms"]


def compile_costs(url: str, prompt, trials: int) -> dict:  # noqa: ANN001
    cold, warm, plain = [], [], []
    for i in range(trials):
        schema = constraint(item_schema(salt=f"_{i}"))
        cold.append(ttft(url, prompt, schema))
        warm.append(ttft(url, prompt, schema))
        plain.append(ttft(url, prompt, {}))
    return {
        "median_ttft_ms_new_schema": statistics.median(cold),
        "median_ttft_ms_repeated_schema": statistics.median(warm),
        "median_ttft_ms_unconstrained": statistics.median(plain),
        "trials": trials,
    }


def mask_cost(model_dir: str, schema: dict, rows: int, steps: int) -> dict:
    """In process, no server: milliseconds per step to advance `rows` matchers by one token and
    mask a [rows, vocab] logits tensor (the work the sampler adds per constrained step)."""
    import time

    import torch

    from vlmserve.frontend.structured_output import json_schema
    from vlmserve.shared.messages import SamplingParams
    from vlmserve.shared.models import read_model_info
    from vlmserve.workers.grammar import GrammarBackend, GrammarMask
    from vlmserve.workers.logits_processors import ProcessorRow

    vocab = read_vocab_size(model_dir)
    backend = GrammarBackend(model_dir, vocab, read_model_info(model_dir).eos_token_ids)
    params = SamplingParams(grammar=json_schema(schema, "bench"))
    masks = [backend.processor_for(params) for _ in range(rows)]
    tokens = [[1] for _ in range(rows)]
    gen = torch.Generator().manual_seed(0)
    spent = []
    for _ in range(steps):
        logits = torch.randn(rows, vocab, generator=gen)
        batch = [ProcessorRow(i, m, tokens[i], 1) for i, m in enumerate(masks)]
        started = time.perf_counter()
        GrammarMask.apply_rows(logits, batch)  # catch up, fill, apply: in place
        spent.append(time.perf_counter() - started)
        for i, token in enumerate(logits.argmax(dim=-1).tolist()):
            tokens[i].append(token)
    return {"rows": rows, "vocab": vocab, "median_ms_per_step": statistics.median(spent) * 1e3}


def read_vocab_size(model_dir: str) -> int:
    import json

    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["vocab_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the engine benchmark's Qwen2")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile-trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "structured.json"))
    args = parser.parse_args()
    model_dir = args.model or bench_checkpoint()
    prompts = random_prompts(
        model_dir, args.num_prompts, args.input_len, args.output_len, args.seed
    )
    modes = {"unconstrained": {}, "json_schema": constraint(item_schema())}
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp, vlmserve_server(model_dir, tmp, 128) as url:
        load(url, prompts[:4], modes["json_schema"])  # warm-up: imports, first compile
        for r in range(args.rounds):
            for mode, extra in modes.items():
                runs[mode].append(load(url, prompts, extra))
                print(
                    f"round {r + 1} {mode}: {runs[mode][-1]['output_throughput']:.1f} tok/s",
                    flush=True,
                )
        costs = compile_costs(url, prompts[0], args.compile_trials)
    masking = mask_cost(model_dir, item_schema(), args.num_prompts, steps=32)
    best = {mode: max(rs, key=lambda r: r["output_throughput"]) for mode, rs in runs.items()}
    ratio = best["json_schema"]["output_throughput"] / best["unconstrained"]["output_throughput"]
    report = {
        "model": model_dir, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "runs": runs, "constrained_over_unconstrained": ratio,
        "compile": costs, "mask_cost": masking, "python": sys.version.split()[0],
    }  # fmt: skip
    print(f"\n{'mode':<15}{'out tok/s (each round)':>28}{'TTFT median ms':>18}{'failed':>8}")
    for mode, rs in runs.items():
        rates = ", ".join(f"{r['output_throughput']:.1f}" for r in rs)
        ttfts = ", ".join(f"{r['median_ttft_ms']:.0f}" for r in rs)
        print(f"{mode:<15}{rates:>28}{ttfts:>18}{sum(r['failed'] for r in rs):>8}")
    print(f"constrained / unconstrained output tok/s (best rounds): {ratio:.3f}")
    print(
        "single-request TTFT median, ms: new schema {median_ttft_ms_new_schema:.1f}, repeated "
        "schema {median_ttft_ms_repeated_schema:.1f}, no schema {median_ttft_ms_unconstrained:.1f}"
        .format(**costs)
    )  # fmt: skip
    print(
        "mask cost per step, in process ({rows} rows, vocab {vocab}): {median_ms_per_step:.2f} ms"
        .format(**masking)
    )  # fmt: skip
    write_json(report, args.out)


if __name__ == "__main__":
    main()
