"""Model specs and the compute side they select, on checkpoints whose configs carry fields our
own builder does not write (as checkpoints re-saved by transformers 5 do)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vlmserve.workers.demo_vlm import build_vision_checkpoint
from vlmserve.workers.loader import load_model

CPU = torch.device("cpu")


def _with_text_field(src: str, dst: str, **fields: object) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    config = json.load(open(path))
    config["text_config"].update(fields)
    json.dump(config, open(path, "w"))
    return dst


def test_vision_half_ignores_the_text_configs_pad_token(tmp_path) -> None:
    """A `text_config.pad_token_id` made the worker die building the vision half (its dropped
    language model got vocab_size 1 and that pad id); the vision half must not depend on it."""
    for arch in ("llava", "qwen2_vl"):
        plain = build_vision_checkpoint(str(tmp_path / arch), arch)
        padded = _with_text_field(plain, str(tmp_path / f"{arch}-pad"), pad_token_id=7)
        ours = load_model(padded, torch.float32, CPU, "aten")  # aten: the values stay loaded
        reference = load_model(plain, torch.float32, CPU, "aten")
        for (name, a), (_, b) in zip(
            ours.vision.state_dict().items(), reference.vision.state_dict().items(), strict=True
        ):
            torch.testing.assert_close(a, b, msg=f"{arch}: {name} differs")


def test_loading_in_another_dtype_changes_no_global_state(tmp_path) -> None:
    """The model is built on the meta device and given real storage in the asked dtype; torch's
    default dtype is never touched, and the weights equal a float32 load's, rounded."""
    model_dir = build_vision_checkpoint(str(tmp_path / "llava"), "llava")
    seen: list[torch.dtype] = []
    real_setter = torch.set_default_dtype
    torch.set_default_dtype = lambda d: seen.append(d)  # type: ignore[assignment]
    try:
        half = load_model(model_dir, torch.bfloat16, CPU, "aten")  # aten: values stay loaded
    finally:
        torch.set_default_dtype = real_setter
    assert seen == [] and torch.get_default_dtype() == torch.float32
    full = load_model(model_dir, torch.float32, CPU, "aten")
    full_params = dict(full.named_parameters())
    for name, param in half.named_parameters():
        assert param.dtype == torch.bfloat16, name
        torch.testing.assert_close(param, full_params[name].to(torch.bfloat16), msg=name)


REAL = os.path.join(os.path.dirname(__file__), "data", "realconfigs")


def test_start_up_knows_the_decoders_the_workers_build() -> None:
    """The torch-free list start-up checks is the workers' own."""
    from vlmserve.shared.models.spec import LLAMA_FAMILY_DECODERS
    from vlmserve.workers.models.llama import _TEXT_DECODERS

    assert sorted(LLAMA_FAMILY_DECODERS) == sorted(_TEXT_DECODERS)


@pytest.mark.parametrize(
    ("folder", "model_type"),
    [
        ("llava-hf__llava-1.5-7b-hf", "gemma"),  # a LLaVA with a Gemma decoder
        ("llava-hf__llava-1.5-7b-hf", "phi3"),
        ("transformers__InternVLConfig-defaults", "qwen3_moe"),  # InternVL3.5's MoE decoder
    ],
)
def test_unserved_text_decoder_is_refused_at_start_in_one_line(folder, model_type, tmp_path):  # noqa: ANN001
    """A multimodal checkpoint whose decoder (text_config.model_type) we do not build is
    refused by `serve api_server` before any process starts, in one line naming the type and
    the supported ones; it used to start and die in the worker with a traceback."""
    model_dir = _with_text_field(
        os.path.join(REAL, folder), str(tmp_path / "ckpt"), model_type=model_type
    )
    out = subprocess.run(
        [sys.executable, "-m", "vlmserve", "serve", "api_server", model_dir],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"unsupported text decoder {model_type!r}" in lines[0], lines[0]
    assert "supported: llama, mistral, qwen2, qwen3" in lines[0], lines[0]
