"""Checkpoints in the original LLaVA repository's format (`LlavaLlamaForCausalLM`, e.g.
liuhaotian/llava-v1.6-vicuna-7b): read as the LLaVA-NeXT model they are.

Their config.json is a Llama config plus `mm_*` fields naming a CLIP tower by path or hub
id; their weights sit under `model.` with the projector as `model.mm_projector.{0,2}`. We
build the equivalent transformers LlavaNextConfig and map the names.
"""

from __future__ import annotations

import json
import os
from typing import Any

import transformers

ARCHITECTURE = "LlavaLlamaForCausalLM"
# Placeholder id for image tokens in the prompt: the original code uses -200, outside the
# vocabulary; ours must embed (its rows are then replaced), so it reuses id 0.
PLACEHOLDER_ID = 0

NAME_PREFIXES = [
    ("model.mm_projector.0.", "vision.hf.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "vision.hf.multi_modal_projector.linear_2."),
    ("model.image_newline", "vision.hf.image_newline"),
    ("model.vision_tower.vision_tower.vision_model.", "vision.hf.vision_tower."),
    ("model.", "language.model."),
    ("lm_head.", "language.lm_head."),
]


def read_original_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def is_original(model_dir: str) -> bool:
    return ARCHITECTURE in (read_original_config(model_dir).get("architectures") or [])


def resolve_tower(model_dir: str, tower: str) -> str:
    """The CLIP tower's directory: a path (absolute, or relative to the checkpoint), or a hub
    id resolved like any model path."""
    for candidate in (tower, os.path.join(model_dir, tower)):
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    from huggingface_hub import snapshot_download

    return snapshot_download(tower)


def hf_config(model_dir: str) -> Any:
    """The transformers LlavaNextConfig equivalent to an original LLaVA-1.6 config."""
    raw = read_original_config(model_dir)
    if raw.get("image_aspect_ratio") != "anyres" or raw.get("mm_projector_type") != "mlp2x_gelu":
        raise ValueError(
            "only LLaVA-1.6 original checkpoints (image_aspect_ratio 'anyres', mm_projector_type "
            f"'mlp2x_gelu') are supported; got {raw.get('image_aspect_ratio')!r}, "
            f"{raw.get('mm_projector_type')!r}"
        )
    tower = resolve_tower(model_dir, raw["mm_vision_tower"])
    vision = transformers.AutoConfig.from_pretrained(tower)
    vision = getattr(vision, "vision_config", vision)  # a full CLIP checkpoint or a tower
    text = {k: v for k, v in raw.items() if not k.startswith(("mm_", "image_", "architectures"))}
    text.pop("model_type", None)
    select = {"patch": "default", "cls_patch": "full"}[raw.get("mm_vision_select_feature", "patch")]
    return transformers.LlavaNextConfig(
        vision_config=vision.to_dict() | {"model_type": "clip_vision_model"},
        text_config=transformers.LlamaConfig(**text).to_dict(),
        image_token_id=PLACEHOLDER_ID,
        image_grid_pinpoints=raw["image_grid_pinpoints"],
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=select,
        projector_hidden_act="gelu",
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        architectures=["LlavaNextForConditionalGeneration"],
    )


def map_name(name: str) -> str:
    for theirs, ours in NAME_PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs) :]
    return name


def tower_name(name: str) -> str | None:
    """A CLIP tower checkpoint's tensor name as ours; None for what we do not use (the text
    half and projections of a full CLIP checkpoint)."""
    if name.startswith("vision_model."):  # a full CLIPModel, or a tower saved by transformers 4
        return "vision.hf.vision_tower." + name[len("vision_model.") :]
    if name.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
        return "vision.hf.vision_tower." + name
    return None


def tower_dir(model_dir: str) -> str:
    return resolve_tower(model_dir, read_original_config(model_dir)["mm_vision_tower"])
