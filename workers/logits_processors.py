"""Per-sequence logits processors: bans and grammar masks (workers/grammar.py), on rank 0.

A processor belongs to one sequence. The sampler applies it to that sequence's row of a step's
logits after logit_bias, the penalties and the min_tokens mask, and before temperature and the
greedy argmax (where vLLM applies structured-output masks), so a banned token can be neither
drawn nor picked greedily. Logprobs are unaffected: they come from the raw logits.

Processors are made by `processors_for` from the sequence's SamplingParams when the sequence
arrives at the workers: a new request, or a preempted one coming back with the tokens it had
generated. So a processor must derive any state it keeps from the token ids it is given,
catching up on tokens it has not seen (a grammar matcher advances over them), and never assume
it saw every step; then a recomputed sequence resumes exactly where it was.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from vlmserve.shared.messages import SamplingParams


class LogitsProcessor(ABC):
    """One sequence's processor."""

    @abstractmethod
    def __call__(self, logits: torch.Tensor, token_ids: list[int], prompt_len: int) -> None:
        """Mask or shift this sequence's next-token logits in place.

        logits: [vocab] float32. token_ids: the sequence's prompt, then every token it has
        generated so far (read only: it is the workers' own list); the first `prompt_len` are
        the prompt. Token ids at or past the vocab size must be ignored, as the sampler does.
        """

    @classmethod
    def apply_rows(cls, logits: torch.Tensor, rows: Sequence[ProcessorRow]) -> None:
        """Apply the processors of `rows` (all of this class) to their rows of `logits`.

        One call per class and step: a class whose rows are cheaper together (a grammar's
        bitmask, moved to the device once) overrides this.
        """
        for row, processor, token_ids, prompt_len in rows:
            processor(logits[row], token_ids, prompt_len)


class ProcessorRow(NamedTuple):
    """A processor and what it sees in one step: its sequence's row of the logits."""

    row: int
    processor: LogitsProcessor
    token_ids: list[int]
    prompt_len: int


def apply_processors(logits: torch.Tensor, rows: Sequence[ProcessorRow]) -> torch.Tensor:
    """A copy of `logits` ([num_seqs, vocab] float32) with every row's processors applied.

    Rows are applied class by class (each class's `apply_rows` once): processors mask tokens,
    and masks give the same result in any order.
    """
    logits = logits.clone()  # the sampler's input may be the model's own tensor
    by_class: dict[type[LogitsProcessor], list[ProcessorRow]] = {}
    for row in rows:
        by_class.setdefault(type(row.processor), []).append(row)
    for kind, kind_rows in by_class.items():
        kind.apply_rows(logits, kind_rows)
    return logits


class BadWords(LogitsProcessor):
    """vLLM's `bad_words`: no generated text may end with one of the words.

    Each word is a token id sequence (the frontend tokenizes the request's strings). Its last
    token is banned wherever the tokens generated so far end with the rest of it; a one-token
    word is banned everywhere. As in vLLM, only generated tokens count, not the prompt's.
    """

    def __init__(self, words: Sequence[Sequence[int]]) -> None:
        # Prefix length -> prefix -> the last tokens banned after it: one dict lookup per
        # distinct word length per step, however many words there are.
        self._endings: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for word in words:
            if word:
                prefixes = self._endings.setdefault(len(word) - 1, {})
                prefixes.setdefault(tuple(word[:-1]), []).append(word[-1])

    @classmethod
    def from_params(cls, params: SamplingParams) -> BadWords | None:
        return cls(params.bad_words_token_ids) if params.bad_words_token_ids else None

    def __call__(self, logits: torch.Tensor, token_ids: list[int], prompt_len: int) -> None:
        generated = len(token_ids) - prompt_len
        banned: list[int] = []
        for length, prefixes in self._endings.items():
            if length <= generated:
                banned += prefixes.get(tuple(token_ids[len(token_ids) - length :]), [])
        banned = [token for token in banned if 0 <= token < logits.shape[-1]]
        if banned:
            logits[torch.tensor(banned, device=logits.device)] = float("-inf")


# Each factory makes a sequence's processor from its SamplingParams, or None when the request
# does not ask for that kind. A new kind is one class and one entry; a kind that needs the
# worker's own state (the grammar mask needs the tokenizer's vocabulary, read at start-up) is
# a bound method the worker adds to these (workers/process.py).
Factory = Callable[[SamplingParams], LogitsProcessor | None]
FACTORIES: tuple[Factory, ...] = (BadWords.from_params,)


def processors_for(
    params: SamplingParams, factories: Sequence[Factory] = FACTORIES
) -> list[LogitsProcessor]:
    """The processors a sequence with these SamplingParams needs; usually none."""
    return [processor for make in factories if (processor := make(params)) is not None]
