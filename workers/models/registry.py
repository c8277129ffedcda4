"""The compute side of each model family, by the family name its spec
(vlmserve.shared.models) gives: the one place that maps a checkpoint to a model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlmserve.shared.models import ModelSpec
from vlmserve.workers.models.gemma3 import Gemma3ForCausalLM, Gemma3Model
from vlmserve.workers.models.idefics3 import Idefics3Model, SmolVLMModel
from vlmserve.workers.models.internvl import InternVLModel
from vlmserve.workers.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from vlmserve.workers.models.llava import LlavaModel, LlavaNextModel
from vlmserve.workers.models.llava_original import LlavaOriginalModel
from vlmserve.workers.models.mistral3 import Mistral3Model
from vlmserve.workers.models.qwen2_vl import Qwen2VLModel, Qwen25VLModel
from vlmserve.workers.models.qwen3_vl import Qwen3VLModel, Qwen3VLMoeModel

COMPUTE: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "llava": LlavaModel,
    "llava_next": LlavaNextModel,
    "llava_original": LlavaOriginalModel,
    "qwen2_vl": Qwen2VLModel,
    "qwen2_5_vl": Qwen25VLModel,
    "qwen3_vl": Qwen3VLModel,
    "qwen3_vl_moe": Qwen3VLMoeModel,
    "internvl": InternVLModel,
    "idefics3": Idefics3Model,
    "smolvlm": SmolVLMModel,
    "mistral3": Mistral3Model,
    "gemma3_text": Gemma3ForCausalLM,
    "gemma3": Gemma3Model,
}


def build_model(spec: ModelSpec, hf_config: Any) -> nn.Module:
    """Our model for a checkpoint's config (weights not loaded)."""
    return COMPUTE[spec.family](hf_config)
