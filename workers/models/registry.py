"""Maps a checkpoint's `architectures` name to the class that implements it."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlmserve.workers.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from vlmserve.workers.models.vision import VISION_HALVES
from vlmserve.workers.models.vlm import VisionLanguageModel

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def build_model(hf_config: Any, architecture: str) -> nn.Module:
    """Our model for a checkpoint's config (weights not loaded)."""
    if architecture in VISION_HALVES:
        return VisionLanguageModel(hf_config, architecture)
    if architecture not in MODELS:
        supported = ", ".join(sorted([*MODELS, *VISION_HALVES]))
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {supported}")
    return MODELS[architecture](hf_config)
