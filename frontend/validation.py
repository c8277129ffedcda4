"""Request validation beyond what the schemas' types and `Meta` constraints say.

`decode_request` turns a body into its schema (any problem is a 400 naming the field); the
cross-field checks here run from the schemas' `__post_init__` hooks, so a decoded request is
a valid one. Checks raise APIError (which msgspec lets through) to name the parameter, or
ValueError when msgspec should say where in the body the problem is (`$.messages[2]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import msgspec

from vlmserve.frontend.errors import bad_request, from_msgspec_error

if TYPE_CHECKING:
    from vlmserve.frontend.schemas import (
        ChatCompletionRequest,
        CompletionRequest,
        SamplingFields,
        TokenizeRequest,
    )

T = TypeVar("T")


def _whole_numbers_as_ints(value: object) -> object:
    """`value` with every float that is a whole number (`2.0`) made an int.

    JSON Schema's `integer` (what /openapi.json says of `n`, `max_tokens`, `seed`, ...) is any
    number without a fractional part, and OpenAI's and vLLM's servers take `2.0` for an int;
    msgspec alone would refuse it. Float fields take ints, so they are unaffected.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers_as_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_numbers_as_ints(item) for key, item in value.items()}
    return value


def decode_request(body: bytes, kind: type[T]) -> T:
    """Decode a JSON body into `kind`; any problem is an APIError (400) naming the field."""
    try:
        return msgspec.convert(_whole_numbers_as_ints(msgspec.json.decode(body)), kind)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise from_msgspec_error(exc) from None


def check_sampling_fields(req: SamplingFields) -> None:
    if req.top_k is not None and req.top_k < -1:
        raise bad_request("`top_k` must be -1 or 0 (off) or a positive number", "top_k")
    for key in req.logit_bias or {}:
        if not (key.isascii() and key.isdigit()):
            raise bad_request(f"`logit_bias` keys must be token ids, got {key!r}", "logit_bias")
    if req.prompt_logprobs and req.stream:  # as vLLM: a streamed answer has no place for them
        raise bad_request(
            "`prompt_logprobs` are not available when `stream=True`", "prompt_logprobs"
        )


def check_chat_request(req: ChatCompletionRequest) -> None:
    if req.top_logprobs and not req.logprobs:
        raise bad_request("`top_logprobs` requires `logprobs` to be true", "top_logprobs")


def check_tokenize_request(req: TokenizeRequest) -> None:
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Send exactly one of `prompt` and `messages`", "prompt")


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts, one per entry: each a string or a list of token ids.

    400 on an empty or mixed batch (msgspec allows one array type per union, so the batch
    forms are checked here rather than by the schema's type).
    """
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("`prompt` must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]  # one tokenized prompt
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        if any(isinstance(p, list) and not p for p in prompt):
            raise bad_request("`prompt` must not contain an empty list of token ids", "prompt")
        return list(prompt)
    raise bad_request(
        "`prompt` must be a string, a list of strings, a list of token ids, "
        "or a list of lists of token ids",
        "prompt",
    )
