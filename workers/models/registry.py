"""Maps a checkpoint's `architectures` name to the class that implements it."""

from __future__ import annotations

from torch import nn

from workers.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODELS:
        supported = ", ".join(sorted(MODELS))
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {supported}")
    return MODELS[architecture]
