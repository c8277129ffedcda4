"""Decoder-only checkpoints of the Llama family: Llama 2/3, Vicuna, Mistral, Qwen2/2.5, Qwen3."""

from __future__ import annotations

from vlmserve.shared.models.spec import ModelSpec


class LlamaSpec(ModelSpec):
    family = "llama"
    architectures = ("LlamaForCausalLM",)


class MistralSpec(ModelSpec):
    family = "mistral"
    architectures = ("MistralForCausalLM",)


class Qwen2Spec(ModelSpec):
    family = "qwen2"
    architectures = ("Qwen2ForCausalLM",)


class Qwen3Spec(ModelSpec):
    family = "qwen3"
    architectures = ("Qwen3ForCausalLM",)


SPECS = [LlamaSpec(), MistralSpec(), Qwen2Spec(), Qwen3Spec()]
