"""Tokenization and placeholder helpers the families' image processors share."""

from __future__ import annotations

import json
import os
from typing import Any


def placeholder_runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of `token_id` in `ids`."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def needs_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether tokenizing a rendered chat should add the tokenizer's own special tokens (a
    Llama BOS): yes, unless the template already wrote them, as the model's processor does.
    (`apply_chat_template(tokenize=True)` would silently drop a BOS the template leaves out.)"""
    bos = tokenizer.bos_token
    return not (bos is not None and text.startswith(bos))


def tokenize_rendered(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=needs_special_tokens(tokenizer, text))["input_ids"]


def processor_chat_template(model_dir: str) -> str | None:
    """The template a checkpoint keeps beside its processor (chat_template.json, as SmolVLM2's
    and other VLMs' are published), which transformers' processor reads and its tokenizer
    does not; None when there is none."""
    path = os.path.join(model_dir, "chat_template.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        template = json.load(f).get("chat_template")
    return template if isinstance(template, str) else None
