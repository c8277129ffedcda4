"""Model specs and the compute side they select, on checkpoints whose configs carry fields our
own builder does not write (as checkpoints re-saved by transformers 5 do)."""

from __future__ import annotations

import json
import os
import shutil

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
        ours = load_model(padded, torch.float32, CPU)
        reference = load_model(plain, torch.float32, CPU)
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
        half = load_model(model_dir, torch.bfloat16, CPU)
    finally:
        torch.set_default_dtype = real_setter
    assert seen == [] and torch.get_default_dtype() == torch.float32
    full = load_model(model_dir, torch.float32, CPU)
    full_params = dict(full.named_parameters())
    for name, param in half.named_parameters():
        assert param.dtype == torch.bfloat16, name
        torch.testing.assert_close(param, full_params[name].to(torch.bfloat16), msg=name)
