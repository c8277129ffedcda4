"""The engine's prompt logprobs (shared.messages.PromptLogprobs) in the shapes clients read.

Two shapes: vLLM's `prompt_logprobs` (a list per prompt token: null for the first, then a dict
token id -> {logprob, rank, decoded_token} holding the prompt token and the top N there), on a
completion choice and at the top of a chat completion; and OpenAI's legacy `echo` with
`logprobs`, where the echoed prompt's tokens lead the choice's `logprobs` lists, the first with
null logprob and top logprobs.

A -inf logprob (a token the model rules out) is written as -9999.0, as vLLM and OpenAI do:
JSON has no infinity.
"""

from __future__ import annotations

from msgspec import UNSET, UnsetType

from vlmserve.frontend.detokenizer import TokenTexts
from vlmserve.frontend.schemas import CompletionLogprobs, CompletionRequest, PromptLogprob
from vlmserve.shared.messages import PromptLogprobs

FLOOR = -9999.0


def clamp(logprob: float) -> float:
    return max(logprob, FLOOR)


def vllm_prompt_logprobs(
    texts: TokenTexts, prompt: list[int], scores: PromptLogprobs, num_top: int
) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's list: None for the first prompt token, then the token's entry followed by the
    top `num_top` at its position (one entry when the token is among them, as vLLM's dict)."""
    out: list[dict[int, PromptLogprob] | None] = [None]
    for i, token in enumerate(prompt[1:]):
        logprob, rank = clamp(scores.logprobs[i]), scores.ranks[i]
        entry = {token: PromptLogprob(logprob, rank, texts.text_of(token))}
        ids, values = scores.top_ids[i][:num_top], scores.top_logprobs[i][:num_top]
        for rank, (top_id, value) in enumerate(zip(ids, values, strict=True), start=1):
            entry[top_id] = PromptLogprob(clamp(value), rank, texts.text_of(top_id))
        out.append(entry)
    return out


def echo_logprobs(
    texts: TokenTexts, prompt: list[int], scores: PromptLogprobs, num_top: int
) -> CompletionLogprobs:
    """The echoed prompt's part of a completion's legacy `logprobs`, offsets counted from 0."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = 0
    for i, token in enumerate(prompt):
        text = texts.text_of(token)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if i == 0:  # nothing before it to score it by
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(clamp(scores.logprobs[i - 1]))
        ids, values = scores.top_ids[i - 1][:num_top], scores.top_logprobs[i - 1][:num_top]
        out.top_logprobs.append(
            {texts.text_of(t): clamp(v) for t, v in zip(ids, values, strict=True)}
        )
    return out


def end_offset(logprobs: CompletionLogprobs) -> int:
    """Where the text after these tokens starts."""
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1]) if logprobs.tokens else 0


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


def echoed_part(
    texts: TokenTexts, req: CompletionRequest, prompt: list[int], scores: PromptLogprobs | None
) -> CompletionLogprobs | None:
    """The echoed prompt's logprobs when the request has `echo` and `logprobs`; else None."""
    if not req.echo or req.logprobs is None:
        return None
    assert scores is not None, "the engine sent no prompt logprobs for an echo with logprobs"
    return echo_logprobs(texts, prompt, scores, req.logprobs)


def requested(
    texts: TokenTexts, num_top: int | None, prompt: list[int], scores: PromptLogprobs | None
) -> list[dict[int, PromptLogprob] | None] | UnsetType:
    """A response's `prompt_logprobs` field: vLLM's list when `num_top` (the request's
    `prompt_logprobs`) asks for it, else left out."""
    if num_top is None:
        return UNSET
    assert scores is not None, "the engine sent no prompt logprobs"
    return vllm_prompt_logprobs(texts, prompt, scores, num_top)
