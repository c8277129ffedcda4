"""Tokenization and placeholder helpers the families' image processors share."""

from __future__ import annotations

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
