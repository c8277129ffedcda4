"""What of a generation request goes to the engine (SamplingParams) and what stays here.

Stop strings, `n`, `echo` and the detokenization options stay with the frontend; everything
that decides which token comes next travels to the workers in SamplingParams.
"""

from __future__ import annotations

from typing import Protocol

from vlmserve.frontend.errors import bad_request
from vlmserve.frontend.sampling_defaults import NO_DEFAULTS, SamplingDefaults
from vlmserve.frontend.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from vlmserve.frontend.structured_output import grammar_for
from vlmserve.shared.messages import SamplingParams


class TextEncoder(Protocol):
    """The part of a Hugging Face tokenizer used here."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def stop_strings(req: SamplingFields) -> list[str]:
    """`stop` as a list; empty strings are dropped (they would match at once)."""
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return [s for s in stop if s]


def bad_words_token_ids(words: list[str], tokenizer: TextEncoder) -> list[list[int]]:
    """The token sequences of `bad_words`, tokenized as vLLM does.

    Each word (leading spaces stripped) alone, and also after a space when that spells it
    with another first token in as many tokens: most vocabularies have a word at the start
    of a text and the same word after a space as different tokens. Blank words ban nothing.
    """
    sequences = []
    for word in (w.lstrip() for w in words):
        plain = tokenizer.encode(word, add_special_tokens=False) if word else []
        if not plain:
            continue
        sequences.append(plain)
        spaced = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(spaced) == len(plain) and spaced[0] != plain[0]:
            sequences.append(spaced)
    return sequences


def prompt_logprobs_asked(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many top candidates per prompt position the answer needs, or None for no prompt
    logprobs: vLLM's `prompt_logprobs` (none when streamed: `prompt_logprobs: 0` with
    `stream` is allowed, as in vLLM, and sends nothing) and, on completions, `echo` with
    `logprobs`, whose echoed tokens get `logprobs` top candidates."""
    asked = None if req.stream else req.prompt_logprobs
    if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
        asked = max(asked or 0, req.logprobs)
    return asked


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def to_sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    default_max_tokens: int,
    tokenizer: TextEncoder,
    defaults: SamplingDefaults = NO_DEFAULTS,
    vocab_size: int | None = None,
) -> SamplingParams:
    """The engine's SamplingParams for a request.

    `default_max_tokens` is used when the request names no limit: what fits in the session
    after the prompt (or the checkpoint's max_new_tokens when smaller). `tokenizer` turns
    `bad_words` into the token ids the workers ban. `defaults` (the checkpoint's
    generation_config.json) fill the sampling fields the request leaves unset. `logit_bias`
    may name any id the model scores (below `vocab_size`, its logits' width), as vLLM allows.
    """
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        # Chat: `logprobs` switches them on, `top_logprobs` says how many alternatives.
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens = req.max_tokens
        logprobs = req.logprobs
    max_tokens = max_tokens or min(default_max_tokens, defaults.max_tokens or default_max_tokens)
    min_tokens = req.min_tokens if req.min_tokens is not None else (req.min_new_tokens or 0)
    if min_tokens > max_tokens:
        raise bad_request(
            f"`min_tokens` ({min_tokens}) must not exceed `max_tokens` ({max_tokens})",
            "min_tokens",
        )
    logit_bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    if vocab_size is not None and any(k >= vocab_size for k in logit_bias):
        raise bad_request(f"`logit_bias` keys must be token ids below {vocab_size}", "logit_bias")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_first(req.temperature, defaults.temperature, 1.0),
        top_p=_first(req.top_p, defaults.top_p, 1.0),
        top_k=max(_first(req.top_k, defaults.top_k, 0), 0),  # vLLM's -1 and our 0: off
        min_p=_first(req.min_p, defaults.min_p, 0.0),
        repetition_penalty=_first(req.repetition_penalty, defaults.repetition_penalty, 1.0),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        logprobs=logprobs,
        min_tokens=min_tokens,
        ignore_eos=req.ignore_eos,
        stop_token_ids=list(req.stop_token_ids or []),
        logit_bias=logit_bias,
        prompt_logprobs=prompt_logprobs_asked(req),
        bad_words_token_ids=bad_words_token_ids(req.bad_words or [], tokenizer),
        grammar=grammar_for(req),  # response_format, structured_outputs, guided_*
    )
