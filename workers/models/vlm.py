"""Vision-language models: our paged decoder plus transformers' vision half.

Image placeholders in the prompt are embedded like any token, then their rows are replaced
by the vision encoder's output (see ModelRunner); the decoder never sees pixels.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from vlmserve.workers.layers.rotary import rope_parameters
from vlmserve.workers.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from vlmserve.workers.models.vision import VisionEncoder

# The decoder class by the text config's model_type.
DECODERS: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen2_vl_text": Qwen2ForCausalLM,
    "qwen2_5_vl_text": Qwen2ForCausalLM,
}

# Checkpoint name prefixes -> ours, first match wins. Both the layout of checkpoints on the
# hub (saved by transformers 4) and that of transformers 5 models are accepted.
NAME_PREFIXES = [
    ("model.language_model.", "language.model."),
    ("language_model.model.", "language.model."),
    ("language_model.lm_head.", "language.lm_head."),
    ("lm_head.", "language.lm_head."),
    ("model.visual.", "vision.hf.visual."),
    ("visual.", "vision.hf.visual."),
    ("model.vision_tower.", "vision.hf.vision_tower."),
    ("vision_tower.", "vision.hf.vision_tower."),
    ("model.multi_modal_projector.", "vision.hf.multi_modal_projector."),
    ("multi_modal_projector.", "vision.hf.multi_modal_projector."),
    ("model.image_newline", "vision.hf.image_newline"),
    ("image_newline", "vision.hf.image_newline"),
    ("model.", "language.model."),  # Qwen2-VL on the hub keeps its decoder under model.
]


class VisionLanguageModel(nn.Module):
    packed_modules = LlamaForCausalLM.packed_modules
    packed_prefix = "language."  # the vision half's q_proj etc. load as they are

    def __init__(self, hf_config: Any, architecture: str) -> None:
        super().__init__()
        text = copy.deepcopy(hf_config.text_config)
        text.tie_word_embeddings = getattr(hf_config, "tie_word_embeddings", False)
        self.language = DECODERS[text.model_type](text)
        self.vision = VisionEncoder(hf_config, architecture)
        self.image_token_id: int = hf_config.image_token_id
        self.uses_mrope = "mrope_section" in rope_parameters(text)
        self.name_prefixes = NAME_PREFIXES  # other checkpoint layouts bring their own

    def map_checkpoint_name(self, name: str) -> str:
        for theirs, ours in self.name_prefixes:
            if name.startswith(theirs):
                name = ours + name[len(theirs) :]
                break
        # transformers 4 saved CLIP towers with a `vision_model.` level that 5 no longer has.
        return name.replace("vision.hf.vision_tower.vision_model.", "vision.hf.vision_tower.")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.language.model(input_ids, positions, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language.compute_logits(hidden)
