"""bench/gpu_check.sh, which proves the engine on a GPU, is not dead code: its CPU dry run (tiny
shapes of the same two families, through the same script) passes here; its parity verdicts,
HBM bound and bandwidth table are checked on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import gpu_check  # noqa: E402


def test_cpu_dry_run(tmp_path) -> None:
    out = tmp_path / "gpu_check.json"
    cmd = [
        "bash", os.path.join(BENCH, "gpu_check.sh"), "--device", "cpu", "--tiny",
        "--steps", "8", "--parity-prompts", "2", "--batches", "1,4", "--prompt-len", "16",
        "--decode-steps", "8", "--hbm-tb-s", "0.05", "--workdir", str(tmp_path), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [m["model"] for m in report["models"]] == ["qwen2-7b", "llava-1.5-7b"]
    for model in report["models"]:
        assert "error" not in model, model
        parity = model["parity"]
        assert parity["passed"] and parity["steps"] == 8
        for prompt in parity["prompts"]:  # float32: the same tokens, or an exact tie
            assert prompt["identical"] or prompt["hf_logit_gap"] < 1e-4, prompt
        assert set(model["decode"]) == {"1", "4"}
        for batch, d in model["decode"].items():
            assert d["decode_tokens"] > 0 and d["decode_tok_s"] > 0, (batch, d)
            assert d["bound_tok_s"] == int(batch) / (d["step_bytes"] / 0.05e12)
            assert d["share_of_bound"] == d["decode_tok_s"] / d["bound_tok_s"]
    assert "eager only" in proc.stdout and "PASS" in proc.stdout


def test_compare_names_the_first_difference() -> None:
    logits = torch.zeros(4, 10)
    logits[:, 3] = 5.0  # transformers' choice at every step
    logits[2, 7] = 4.999  # a near-tie at step 2 only
    assert gpu_check.compare([3, 3, 3, 3], [3, 3, 3, 3], logits, 0.01)["identical"]
    tie = gpu_check.compare([3, 3, 7, 1], [3, 3, 3, 3], logits, 0.01)
    assert (tie["identical"], tie["first_difference"], tie["near_tie"]) == (False, 2, True)
    assert tie["engine_token"] == 7 and tie["hf_rank_of_engine_token"] == 1
    wrong = gpu_check.compare([3, 1, 3, 3], [3, 3, 3, 3], logits, 0.01)
    assert (wrong["first_difference"], wrong["near_tie"]) == (1, False)
    assert wrong["hf_logit_gap"] == 5.0
    short = gpu_check.compare([3, 3], [3, 3, 3, 3], logits, 0.01)
    assert (short["identical"], short["first_difference"]) == (False, 2)


def test_decode_bound_counts_the_decoder_of_qwen2_7b() -> None:
    config = transformers.AutoConfig.from_pretrained(gpu_check.MODELS["qwen2-7b"])
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    # Qwen2-7B: 7,615,616,512 parameters, of which the 152,064 x 3,584 embedding table is not
    # read by a decode step; 28 layers x 4 KV heads x 128 x 2 (K and V) values per token.
    bound = gpu_check.decode_bound(config, model, 32, 1000, torch.bfloat16, 4.8)
    weights = 7_615_616_512 - 152_064 * 3_584
    assert bound["weight_bytes"] == 2 * weights
    assert bound["step_bytes"] == 2 * (weights + 32 * 1000 * 28 * 4 * 128 * 2)
    assert bound["bound_tok_s"] == 32 * 4.8e12 / bound["step_bytes"]


def test_bandwidth_table_by_gpu_name() -> None:
    assert gpu_check.table_tb_s("NVIDIA H200") == 4.8
    assert gpu_check.table_tb_s("NVIDIA H100 80GB HBM3") == 3.35
    assert gpu_check.table_tb_s("NVIDIA H100 PCIe") == 2.0
    assert gpu_check.table_tb_s("NVIDIA A100-SXM4-80GB") == 2.039
    assert gpu_check.table_tb_s("Some Future GPU") is None
