"""Decoder-only checkpoints of the Llama family: Llama 2/3, Vicuna, Mistral, Qwen2/2.5."""

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


SPECS = [LlamaSpec(), MistralSpec(), Qwen2Spec()]
