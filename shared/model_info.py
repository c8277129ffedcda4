"""What the scheduler and frontends need to know of a checkpoint, read from its JSON files.

No torch and no transformers here: the scheduler must not import them.
"""

from __future__ import annotations

import json
import os

import msgspec


class ModelInfo(msgspec.Struct, frozen=True):
    architecture: str
    eos_token_ids: list[int]
    max_position_embeddings: int


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_model_info(model_dir: str) -> ModelInfo:
    """Architecture, end-of-sequence ids (generation config first) and the context length."""
    config = _read_json(os.path.join(model_dir, "config.json"))
    if not config:
        raise FileNotFoundError(f"no config.json in {model_dir!r}")
    generation = _read_json(os.path.join(model_dir, "generation_config.json"))
    text = config.get("text_config") or config
    eos = _as_list(generation.get("eos_token_id")) or _as_list(
        text.get("eos_token_id", config.get("eos_token_id"))
    )
    max_len = int(text.get("max_position_embeddings", 4096))
    window = text.get("sliding_window")
    if window and text.get("use_sliding_window", True):
        # Attention here is over the whole context: cap requests at the window instead.
        max_len = min(max_len, int(window))
    return ModelInfo(
        architecture=(config.get("architectures") or ["unknown"])[0],
        eos_token_ids=eos,
        max_position_embeddings=max_len,
    )


def session_len(requested: int, info: ModelInfo) -> int:
    """--session-len, or the model's context length when 0; never beyond what it was trained
    for (its position tables end there)."""
    if requested > info.max_position_embeddings:
        limit = info.max_position_embeddings
        raise ValueError(f"--session-len {requested} exceeds the model's {limit} positions")
    return requested or info.max_position_embeddings
