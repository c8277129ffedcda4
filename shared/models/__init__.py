"""The model families vlmserve serves, and the one registry from a checkpoint's
`architectures` name to its spec. No other module names an architecture.

Adding a family: docs/adding-a-model.md.
"""

from __future__ import annotations

import os

from vlmserve.shared.models import (
    gemma3,
    idefics3,
    internvl,
    llama,
    llava,
    llava_original,
    mistral3,
    qwen2_vl,
    qwen3_vl,
)
from vlmserve.shared.models.spec import ModelInfo, ModelSpec, read_json, session_len

__all__ = [
    "SPECS",
    "ModelInfo",
    "ModelSpec",
    "UnsupportedArchitecture",
    "UnsupportedCheckpoint",
    "checkpoint_spec",
    "read_model_info",
    "session_len",
    "spec_for",
    "supported_architectures",
]

SPECS: list[ModelSpec] = [
    *llama.SPECS,
    *llava.SPECS,
    *llava_original.SPECS,
    *qwen2_vl.SPECS,
    *qwen3_vl.SPECS,
    *internvl.SPECS,
    *idefics3.SPECS,
    *mistral3.SPECS,
    *gemma3.SPECS,
]
_BY_ARCHITECTURE = {name: spec for spec in SPECS for name in spec.architectures}


class UnsupportedArchitecture(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def spec_for(architecture: str) -> ModelSpec:
    if architecture not in _BY_ARCHITECTURE:
        supported = ", ".join(supported_architectures())
        raise UnsupportedArchitecture(
            f"unsupported architecture {architecture!r}; supported: {supported}"
        )
    return _BY_ARCHITECTURE[architecture]


class UnsupportedCheckpoint(ValueError):
    pass


def checkpoint_spec(model_dir: str) -> ModelSpec:
    """The spec of the checkpoint in `model_dir`, by its config.json's `architectures`."""
    config = read_json(os.path.join(model_dir, "config.json"))
    if not config:
        raise FileNotFoundError(f"no config.json in {model_dir!r}")
    spec = spec_for((config.get("architectures") or ["unknown"])[0])
    spec.check_config(config)
    quantization = config.get("quantization_config")
    if quantization:  # its weights are packed integers our layers cannot load
        method = quantization.get("quant_method", "unknown")
        raise UnsupportedCheckpoint(
            f"quantized checkpoints ({method}) are not supported yet; serve the unquantized model"
        )
    return spec


def read_model_info(model_dir: str) -> ModelInfo:
    return checkpoint_spec(model_dir).model_info(model_dir)
