"""GPU check: 7B-shaped random checkpoints built on this machine, greedy parity with transformers
on the GPU, and offline decode tok/s next to the HBM-bandwidth bound. Run by bench/gpu_check.sh.

    bench/gpu_check.sh [--models qwen2-7b,llava-1.5-7b] [--batches 1,32,128] [--hbm-tb-s 4.8]
    bench/gpu_check.sh --device cpu --tiny      # the dry run the tests use

For each model (Qwen2-7B's shape, from Qwen2.5-7B-Instruct's published config, which has the
same shape; LLaVA-1.5-7B's, from llava-hf's): random weights drawn on the device in bf16 with
the published initializer range, saved as a Hugging Face checkpoint (tokenizer: a small BPE
with the published special tokens at their real ids, as vlmserve.workers.demo_real makes).

1. Parity: transformers `generate` (greedy, each prompt alone) on the in-memory model against
   the engine (scheduler + worker processes, every prompt at once) for `--steps` tokens; the
   LLaVA prompts carry a 336x336 image each, preprocessed by the frontend's code, checked
   against transformers' processor. A difference is accepted only at a near-tie: where the
   engine's token is within `--tie` (relative to the largest |logit|) of transformers' best
   logit at that step; else the check fails and says where (first differing position).
2. Decode: at each batch size B, B prompts of `--prompt-len` random tokens, `--decode-steps`
   output tokens each, EOS ignored, in one engine; decode tok/s counts the tokens that arrive
   after every request has its first one, over that time. The bound beside it: a decode step
   must read the decoder's weights (not the embedding table nor the vision tower) and the KV
   cache of B sequences at their mean length, from memory of `--hbm-tb-s` TB/s (default: by
   GPU name, from HBM_TB_S). The engine has no CUDA graphs yet: every figure is eager.

Phases past an 8-minute budget (`--budget-s`) are skipped and reported so. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time

import msgspec
import numpy as np
import torch
import transformers
from PIL import Image
from report import write_json

from vlmserve.deploy.launcher import scheduler_and_workers
from vlmserve.frontend.generation import EnginePrompt
from vlmserve.frontend.prompts import Prompter
from vlmserve.frontend.scheduler_client import SchedulerClient
from vlmserve.frontend.schemas import ChatMessage
from vlmserve.shared.messages import SamplingParams
from vlmserve.workers.demo_real import COPIED, INIT_RANGE, save_tokenizer, shrink_config

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "tests", "data", "realconfigs")
MODELS = {
    "qwen2-7b": os.path.join(CONFIGS, "Qwen__Qwen2.5-7B-Instruct"),  # Qwen2-7B's shape
    "llava-1.5-7b": os.path.join(CONFIGS, "llava-hf__llava-1.5-7b-hf"),
}
# Peak memory bandwidth (TB/s) by a substring of torch.cuda.get_device_name(); first match wins.
HBM_TB_S = (
    ("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("GH200", 4.0), ("B200", 8.0),
    ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555), ("L40S", 0.864),
    ("L40", 0.864), ("A10", 0.6), ("L4", 0.3), ("RTX 4090", 1.008), ("V100", 0.9),
)  # fmt: skip
TRAINED_TOKENS = 600  # the small BPE's own tokens: prompts draw from these


class Budget:
    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> bool:
        return self.elapsed() < self.seconds


def log(msg: str) -> None:
    print(msg, flush=True)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def build(name: str, out_dir: str, tiny: bool, device: torch.device, dtype: torch.dtype):  # noqa: ANN201
    """A random checkpoint of `name`'s shape at out_dir; returns the transformers model
    (on `device`, in `dtype`) with the weights that were saved."""
    config_dir = MODELS[name]
    raw = read_json(os.path.join(config_dir, "config.json"))
    config = shrink_config(raw) if tiny else dict(raw)
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    for file in COPIED:
        if os.path.exists(os.path.join(config_dir, file)):
            shutil.copy(os.path.join(config_dir, file), out_dir)
    save_tokenizer(config_dir, out_dir, seed=0)
    hf_config = transformers.AutoConfig.from_pretrained(out_dir)
    if tiny:  # wide weights: clear greedy choices in a model this small
        hf_config.initializer_range = INIT_RANGE
        for sub in ("text_config", "vision_config"):
            if hasattr(hf_config, sub):
                getattr(hf_config, sub).initializer_range = INIT_RANGE
    cls = getattr(transformers, raw["architectures"][0])
    torch.manual_seed(0)
    started = time.monotonic()
    with torch.device(device):  # drawn where it runs: a 7B model in seconds on a GPU
        model = cls._from_config(hf_config, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {params / 1e9:.2f} B parameters drawn in {time.monotonic() - started:.0f} s")
    started = time.monotonic()
    model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:  # the published form, kept
        json.dump(config, f)
    generation = os.path.join(config_dir, "generation_config.json")
    if os.path.exists(generation):
        shutil.copy(generation, out_dir)
    log(f"{name}: saved to {out_dir} in {time.monotonic() - started:.0f} s")
    return model


def text_of(hf_config) -> object:  # noqa: ANN001
    return getattr(hf_config, "text_config", hf_config)


def test_image(seed: int, size: int = 336) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def parity_prompts(name: str, model_dir: str, n: int) -> list[dict]:
    """n prompts: token ids (and for LLaVA, the image, its engine frames, its pixel values)."""
    rng = random.Random(0)
    if not name.startswith("llava"):
        return [{"ids": [rng.randrange(3, TRAINED_TOKENS) for _ in range(rng.randint(8, 64))]}
                for _ in range(n)]  # fmt: skip
    prompter = Prompter(model_dir, 4096)
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    out = []
    for i in range(n):
        image = test_image(i)  # 336x336; the processor resizes it to its tower's size
        words = " ".join(rng.choice(["describe", "the", "picture", "colour", "what"])
                         for _ in range(rng.randint(2, 8)))  # fmt: skip
        message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                               {"type": "text", "text": words}]}  # fmt: skip
        ids, processed = prompter.chat_inputs(
            [json_to_message(message)], [image]
        )  # the frontend's own path
        rendered = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}],
            add_generation_prompt=True,
        )
        ref = processor(text=rendered, images=[image], return_tensors="pt")
        ref_ids = ref["input_ids"][0].tolist()
        if ref_ids != ids:
            differ = [j for j, (a, b) in enumerate(zip(ids, ref_ids, strict=False)) if a != b]
            first = differ[0] if differ else min(len(ids), len(ref_ids))
            raise AssertionError(
                f"{name}: the frontend's prompt ids ({len(ids)}) differ from transformers' "
                f"processor's ({len(ref_ids)}), first at position {first}"
            )
        out.append({"ids": ids, "engine": EnginePrompt.with_images(ids, processed),
                    "pixel_values": ref["pixel_values"]})  # fmt: skip
    return out


def json_to_message(message: dict) -> ChatMessage:
    return msgspec.convert(message, ChatMessage)


@torch.inference_mode()
def hf_greedy(model, prompts: list[dict], steps: int, device: torch.device) -> list[dict]:  # noqa: ANN001
    out = []
    for p in prompts:
        ids = torch.tensor([p["ids"]], device=device)
        extra = {}
        if "pixel_values" in p:
            extra["pixel_values"] = p["pixel_values"].to(device, model.dtype)
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
            do_sample=False, return_dict_in_generate=True, output_logits=True, **extra,
        )  # fmt: skip
        logits = torch.cat(gen.logits).float().cpu()  # [steps, vocab]
        out.append({"tokens": gen.sequences[0, len(p["ids"]) :].tolist(), "logits": logits})
    return out


def compare(ours: list[int], ref: list[int], logits: torch.Tensor, tie: float) -> dict:
    """Identical, or the first differing position and whether it is a near-tie there."""
    for pos, (a, b) in enumerate(zip(ours, ref, strict=False)):
        if a != b:
            row = logits[pos]
            gap = (row.max() - row[a]).item()
            scale = row.abs().max().item()
            rank = int((row > row[a]).sum())
            return {
                "identical": False, "first_difference": pos, "engine_token": a, "hf_token": b,
                "hf_logit_gap": gap, "hf_rank_of_engine_token": rank,
                "near_tie": gap <= tie * scale, "matched": pos,
            }  # fmt: skip
    same = len(ours) == len(ref)
    return {"identical": same, "matched": min(len(ours), len(ref)), "near_tie": False,
            "first_difference": None if same else min(len(ours), len(ref))}  # fmt: skip


async def stream_all(config, prompts: list[dict], params: SamplingParams) -> list[dict]:  # noqa: ANN001
    """Every prompt at once through the engine; each output's arrival time and tokens."""
    client = SchedulerClient(config)
    await client.start(600)
    try:
        deadline = time.monotonic() + 600
        while not client.alive:
            if time.monotonic() > deadline:
                raise TimeoutError("engine did not come up")
            await asyncio.sleep(0.05)

        async def one(i: int, p: dict) -> dict:
            engine = p.get("engine") or EnginePrompt(p["ids"])
            arrivals: list[tuple[float, int]] = []
            tokens: list[int] = []
            error = None
            async for out in client.generate(
                f"g{i}", engine.token_ids, params, engine.images, engine.frames
            ):
                arrivals.append((time.perf_counter(), len(out.token_ids)))
                tokens.extend(out.token_ids)
                error = error or out.error
            return {"tokens": tokens, "arrivals": arrivals, "error": error}

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        await client.close()


def decode_rate(results: list[dict]) -> dict:
    """Tokens that arrived after every request had its first, over that time."""
    t0 = max(r["arrivals"][0][0] for r in results)
    end = max(r["arrivals"][-1][0] for r in results)
    after = sum(n for r in results for t, n in r["arrivals"] if t > t0)
    return {"decode_tokens": after, "decode_s": end - t0,
            "decode_tok_s": after / (end - t0) if end > t0 else 0.0}  # fmt: skip


def decode_bound(hf_config, model, batch: int, context: float, dtype: torch.dtype,
                 tb_s: float | None) -> dict:  # noqa: ANN001  # fmt: skip
    """Bytes one decode step must read, and the tok/s that `tb_s` allows at that."""
    text = text_of(hf_config)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    weights = sum(p.numel() for n, p in decoder.named_parameters() if "embed_tokens" not in n)
    weights += model.get_output_embeddings().weight.numel()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    kv_per_token = 2 * text.num_hidden_layers * kv_heads * head_dim
    step_bytes = (weights + batch * context * kv_per_token) * dtype.itemsize
    bound = batch / (step_bytes / (tb_s * 1e12)) if tb_s else None
    return {"step_bytes": step_bytes, "weight_bytes": weights * dtype.itemsize,
            "bound_tok_s": bound}  # fmt: skip


def table_tb_s(gpu_name: str) -> float | None:
    """Peak memory bandwidth of a GPU by its torch name, from HBM_TB_S."""
    return next((tb_s for key, tb_s in HBM_TB_S if key in gpu_name), None)


def bandwidth(device: torch.device, flag: float | None) -> tuple[float | None, str]:
    if flag:
        return flag, "--hbm-tb-s"
    if device.type != "cuda":
        return None, "no table entry for a CPU: pass --hbm-tb-s"
    name = torch.cuda.get_device_name(device)
    tb_s = table_tb_s(name)
    return tb_s, f"table ({name})" if tb_s else f"{name} is not in the table: pass --hbm-tb-s"


def check_model(name: str, args: argparse.Namespace, budget: Budget, workdir: str) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model_dir = os.path.join(workdir, name)
    model = build(name, model_dir, args.tiny, device, dtype)
    hf_config = model.config
    result: dict = {"model": name, "dir": model_dir, "parameters": sum(
        p.numel() for p in model.parameters())}  # fmt: skip
    prompts = parity_prompts(name, model_dir, args.parity_prompts)
    log(f"{name}: transformers greedy, {len(prompts)} prompts x {args.steps} steps ...")
    ref = hf_greedy(model, prompts, args.steps, device)
    tb_s, tb_source = bandwidth(device, args.hbm_tb_s)
    batches = [int(b) for b in args.batches.split(",")]
    context = args.prompt_len + args.decode_steps / 2
    bounds = {b: decode_bound(hf_config, model, b, context, dtype, tb_s) for b in batches}
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    settings = {"max_batch_size": max(batches), "device": args.device, "dtype": args.dtype,
                "log_level": "WARNING"}  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as tmp,
        scheduler_and_workers(model_dir, tmp, **settings) as eng,
    ):
        log(f"{name}: engine greedy, {len(prompts)} prompts at once ...")
        greedy = SamplingParams(max_tokens=args.steps, temperature=0.0, ignore_eos=True)
        ours = asyncio.run(stream_all(eng["config"], prompts, greedy))
        checks = []
        for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
            if o["error"]:
                raise RuntimeError(f"{name}: engine request {i} failed: {o['error']}")
            checks.append(compare(o["tokens"], r["tokens"], r["logits"], args.tie))
        passed = all(c["identical"] or c["near_tie"] for c in checks)
        result["parity"] = {"steps": args.steps, "prompts": checks, "passed": passed}
        for i, c in enumerate(checks):
            if not c["identical"]:
                log(f"{name}: prompt {i}: first difference at generated position "
                    f"{c['first_difference']}: engine {c.get('engine_token')}, transformers "
                    f"{c.get('hf_token')} (transformers' logit gap {c.get('hf_logit_gap', 0):.3g}"
                    f", rank {c.get('hf_rank_of_engine_token')}); "
                    f"{'accepted near-tie' if c['near_tie'] else 'FAIL'}")  # fmt: skip
        result["decode"] = {}
        rng = random.Random(1)
        for b in batches:
            if not budget.left():
                result["decode"][b] = {"skipped": f"over the {budget.seconds:.0f} s budget"}
                continue
            log(f"{name}: decode at batch {b} ...")
            work = [{"ids": [rng.randrange(3, TRAINED_TOKENS) for _ in range(args.prompt_len)]}
                    for _ in range(b)]  # fmt: skip
            params = SamplingParams(max_tokens=args.decode_steps, temperature=0.0, ignore_eos=True)
            runs = asyncio.run(stream_all(eng["config"], work, params))
            errors = [r["error"] for r in runs if r["error"]]
            if errors:
                raise RuntimeError(f"{name}: decode at batch {b} failed: {errors[:3]}")
            rate = decode_rate(runs)
            bound = bounds[b]["bound_tok_s"]
            result["decode"][b] = {
                **rate, **bounds[b], "mode": "eager only (no CUDA graphs in the engine yet)",
                "share_of_bound": rate["decode_tok_s"] / bound if bound else None,
            }  # fmt: skip
    result["hbm_tb_s"], result["hbm_source"] = tb_s, tb_source
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def print_report(report: dict) -> None:
    print(
        f"\nGPU check on {report['device_name']} ({report['dtype']}, {report['elapsed_s']:.0f} s)"
    )
    print("| model | batch | decode tok/s | mode | HBM bound tok/s | share | parity |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in report["models"]:
        if "error" in r:
            print(f"| {r['model']} | | | | | | ERROR: {r['error']} |")
            continue
        p = r["parity"]
        kinds = ["identical" if c["identical"] else f"near-tie at {c['first_difference']}"
                 if c["near_tie"] else f"DIFFERS at {c['first_difference']}"
                 for c in p["prompts"]]  # fmt: skip
        parity = f"{'PASS' if p['passed'] else 'FAIL'} ({', '.join(kinds)}; {p['steps']} steps)"
        for b, d in r["decode"].items():
            if "skipped" in d:
                print(f"| {r['model']} | {b} | skipped: {d['skipped']} | | | | {parity} |")
                continue
            bound = f"{d['bound_tok_s']:.0f}" if d["bound_tok_s"] else "n/a"
            share = f"{d['share_of_bound']:.2f}" if d["share_of_bound"] else ""
            print(f"| {r['model']} | {b} | {d['decode_tok_s']:.1f} | eager only | {bound} | "
                  f"{share} | {parity} |")  # fmt: skip
        print(f"HBM bandwidth for {r['model']}: {r['hbm_tb_s'] or 'n/a'} TB/s ({r['hbm_source']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes of the same families")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=32, help="greedy parity steps")
    parser.add_argument("--parity-prompts", type=int, default=4)
    parser.add_argument(
        "--tie", type=float, default=0.01, help="near-tie: logit gap / the largest |logit|"
    )
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--hbm-tb-s", type=float, default=None, help="else by GPU name")
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--workdir", default=None, help="checkpoints (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu_check.json"))
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here; for a dry run: --device cpu --tiny")
    budget = Budget(args.budget_s)
    report = {
        "device": args.device, "dtype": args.dtype, "tiny": args.tiny,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "models": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for name in args.models.split(","):
            if not budget.left():
                report["models"].append({"model": name, "error": "skipped: over the budget"})
                continue
            try:
                report["models"].append(check_model(name, args, budget, workdir))
            except Exception as exc:  # reported in the table; the next model still runs
                log(f"{name}: {type(exc).__name__}: {exc}")
                report["models"].append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)  # 15 GB each
            gc.collect()
    report["elapsed_s"] = budget.elapsed()
    print_report(report)
    write_json(report, args.out)
    ok = all("error" not in r and r["parity"]["passed"] for r in report["models"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
