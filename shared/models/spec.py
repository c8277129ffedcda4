"""What a model family tells the rest of vlmserve about its checkpoints: the input side.

A `ModelSpec` reads a checkpoint's configuration, says how long its sessions may be and which
tokens end them, prepares its images (processor, placeholder expansion) and supplies a chat
template where the checkpoint has none. It is torch-free, so the frontend and the scheduler use
it; the family's compute side (decoder, vision half, weight names) lives in
`vlmserve.workers.models`, keyed by `ModelSpec.family`. Families override only what differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

if TYPE_CHECKING:  # the scheduler imports this module: no transformers or PIL at run time
    import numpy as np
    from PIL import Image


class ModelInfo(msgspec.Struct, frozen=True):
    """What every process needs of a checkpoint."""

    architecture: str
    eos_token_ids: list[int]
    max_position_embeddings: int


@dataclass
class PlacedImage:
    """One image of a prompt: where its placeholder tokens are and the arrays its vision tower
    takes (each with a leading per-image dimension)."""

    offset: int  # first placeholder token
    length: int  # placeholder tokens: one per embedding the vision tower gives
    arrays: dict[str, np.ndarray]


class ImageProcessor(Protocol):
    def process(self, text: str, images: list[Image.Image]) -> tuple[list[int], list[PlacedImage]]:
        """The rendered prompt's token ids, image placeholders expanded, and each image placed."""
        ...


# The text decoders of the shared Llama-family decoder (`decoder_for` in
# vlmserve.workers.models.llama), by text_config.model_type: kept here, torch-free, so that start-up
# refuses a checkpoint whose decoder is not among them (tests/test_model_specs.py keeps the two in
# step).
LLAMA_FAMILY_DECODERS = ("llama", "mistral", "qwen2", "qwen3")


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


class ModelSpec:
    """A family of checkpoints. Subclasses set `family` and `architectures` and override the
    methods where the family differs from a plain Hugging Face decoder."""

    family: str = ""  # the compute side's key in vlmserve.workers.models.registry
    architectures: tuple[str, ...] = ()
    # The text_config model types the family's compute side builds; empty: not checked (the
    # family has a decoder of its own, or a flat config).
    text_decoders: tuple[str, ...] = ()
    # An image's tokens attend to each other both ways (Gemma 3): the scheduler never ends a
    # prefill chunk inside one (the compute side's model says the same for the attention).
    bidirectional_images: bool = False

    def check_config(self, raw: dict) -> None:
        """Refuse, at start-up and in one line, a config.json whose text decoder this family
        does not build (a LLaVA with a Gemma or Phi-3 decoder). A text_config without a
        model_type gets its family's default decoder from transformers, which is served."""
        text = raw.get("text_config")
        model_type = text.get("model_type") if isinstance(text, dict) else None
        if self.text_decoders and model_type and model_type not in self.text_decoders:
            architecture = (raw.get("architectures") or ["unknown"])[0]
            raise ValueError(
                f"unsupported text decoder {model_type!r} (text_config.model_type) in a "
                f"{architecture}; supported: {', '.join(self.text_decoders)}"
            )

    def raw_config(self, model_dir: str) -> dict:
        config = read_json(os.path.join(model_dir, "config.json"))
        if not config:
            raise FileNotFoundError(f"no config.json in {model_dir!r}")
        return config

    def text_config(self, raw: dict) -> dict:
        """The decoder's part of config.json (nested under text_config in multimodal ones)."""
        return raw.get("text_config") or raw

    def hf_config(self, model_dir: str) -> Any:
        """The transformers config the workers build the model from."""
        import transformers

        return transformers.AutoConfig.from_pretrained(model_dir)

    def model_info(self, model_dir: str) -> ModelInfo:
        """Architecture, end-of-sequence ids (generation config first) and context length."""
        raw = self.raw_config(model_dir)
        generation = read_json(os.path.join(model_dir, "generation_config.json"))
        text = self.text_config(raw)
        eos = as_list(generation.get("eos_token_id")) or as_list(
            text.get("eos_token_id", raw.get("eos_token_id"))
        )
        return ModelInfo(
            architecture=(raw.get("architectures") or ["unknown"])[0],
            eos_token_ids=eos,
            max_position_embeddings=self.max_context(text),
        )

    def max_context(self, text: dict) -> int:
        """The positions the model was trained for; a sliding window does not shorten a
        session (the attention layers apply it, workers/layers/attention.py)."""
        return int(text.get("max_position_embeddings", 4096))

    def image_processor(self, model_dir: str) -> ImageProcessor | None:
        """The image side of a vision-language family; None for a text-only one."""
        return None

    def chat_template(self) -> str | None:
        """A template for checkpoints of this family that ship none."""
        return None


def session_len(requested: int, info: ModelInfo) -> int:
    """--session-len, or the model's context length when 0; never beyond what it was trained
    for (its position tables end there)."""
    if requested > info.max_position_embeddings:
        limit = info.max_position_embeddings
        raise ValueError(f"--session-len {requested} exceeds the model's {limit} positions")
    return requested or info.max_position_embeddings
