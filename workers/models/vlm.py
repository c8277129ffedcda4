"""Vision-language models: our paged decoder plus transformers' vision half.

Image placeholders in the prompt are embedded like any token, then their rows are replaced
by the vision encoder's output (see ModelRunner); the decoder never sees pixels. A family
subclasses `VisionLanguageModel` with the transformers class of its vision half and the
names its checkpoints give their tensors.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from vlmserve.workers.layers.deepstack import LayerAdditions
from vlmserve.workers.models.llama import LlamaForCausalLM, decoder_for
from vlmserve.workers.models.vision import VisionEncoder

WeightSource = tuple[str, Any]  # a directory of safetensors, and a name mapping (or None)


class VisionLanguageModel(nn.Module):
    packed_modules = LlamaForCausalLM.packed_modules
    packed_prefix = "language."  # the vision half's q_proj etc. load as they are
    vision_half = ""  # transformers' multimodal model class holding the vision half
    # Checkpoint name prefixes -> ours, first match wins.
    name_prefixes: list[tuple[str, str]] = []
    uses_mrope = False  # multimodal RoPE: positions [3, tokens] from rope_index
    encoder = VisionEncoder  # what runs the vision half (one that returns DeepStack levels)
    # An image's placeholders are all the tokens of its span, or (Idefics3's tile separators)
    # only its image_token_id ones, the others keeping their own embeddings.
    image_span_holds_text = False

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        text = copy.deepcopy(hf_config.text_config)
        text.tie_word_embeddings = getattr(hf_config, "tie_word_embeddings", False)
        self.language = self.decoder_class(text)(text)
        # transformers' vision half computes buffers when built (position ids, RoPE tables),
        # so it is built for real, on the CPU in float32, even when the decoder is built on
        # the meta device; the loader then moves it where the model goes.
        with torch.device("cpu"):
            self.vision = self.encoder(hf_config, self.vision_class(hf_config))
        # Checkpoint tensors of the layers the vision half dropped: the loader skips them.
        self.skipped_weights = tuple("vision." + name for name in self.vision.dropped)
        self.image_token_id: int = hf_config.image_token_id

    def placeholder_ids(self) -> torch.Tensor:
        """The token ids of a span that take the encoder's rows (image_span_holds_text)."""
        return torch.tensor([self.image_token_id])

    def vision_class(self, hf_config: Any) -> str:
        return self.vision_half

    def decoder_class(self, text_config: Any) -> type[LlamaForCausalLM]:
        return decoder_for(text_config)

    def map_checkpoint_name(self, name: str) -> str:
        for theirs, ours in self.name_prefixes:
            if name.startswith(theirs):
                return ours + name[len(theirs) :]
        return name

    def weight_sources(self, model_dir: str) -> list[WeightSource]:
        return [(model_dir, None)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
        additions: LayerAdditions | None = None,
    ) -> torch.Tensor:
        return self.language.model(input_ids, positions, input_embeds, additions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language.compute_logits(hidden)
