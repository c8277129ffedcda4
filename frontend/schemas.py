"""OpenAI request and response bodies as msgspec Structs: the source of /openapi.json.

Requests are decoded strictly by type and `Meta` constraints (a bad body is a 400 naming
the field) but unknown fields are ignored, because clients send extras (`session_id`,
`tools: []`, ...) that we do not serve. Optional request fields accept `null`, as OpenAI's
do. Response field names and nullability follow the `openai` Python package's types: a
chunk's `finish_reason` and a choice's `logprobs` are sent as `null`, not left out.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from vlmserve.frontend.errors import bad_request, from_msgspec_error
from vlmserve.shared.messages import SamplingParams

T = TypeVar("T")

# ---- constrained scalars ---------------------------------------------------------------------

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
# OpenAI caps n at 128; every choice is a sequence holding KV blocks, so we allow fewer.
NumChoices = Annotated[int, Meta(ge=1, le=16)]
TopLogprobsCount = Annotated[int, Meta(ge=0, le=20)]
LogitBias = dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]]

FinishReason = Literal["stop", "length"]

# ---- chat messages ---------------------------------------------------------------------------


class ImageURL(msgspec.Struct, kw_only=True):
    url: Annotated[str, Meta(description="http(s) URL, or a data: URL with base64 image bytes")]
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    text: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url", kw_only=True):
    # A bare string is the URL; LMDeploy and some clients send it that way.
    image_url: ImageURL | str


ContentPart = TextPart | ImagePart


class ChatMessage(msgspec.Struct, kw_only=True):
    """One turn of the conversation. Tool and function messages are not served."""

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        # ValueError (not APIError) so msgspec reports where: `$.messages[2]`.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"`content` is required for a {self.role} message")


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


# ---- generation requests ---------------------------------------------------------------------


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by /v1/chat/completions and /v1/completions (OpenAI, then vLLM/LMDeploy)."""

    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: NumChoices = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[
        LogitBias | None, Meta(description="token id (as a string) -> bias added to its logit")
    ] = None
    user: str | None = None
    # Extensions that vLLM and LMDeploy accept.
    top_k: Annotated[int | None, Meta(description="0 or -1: off")] = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    min_tokens: NonNegativeInt | None = None
    min_new_tokens: Annotated[
        NonNegativeInt | None, Meta(description="LMDeploy's name for min_tokens")
    ] = None
    stop_token_ids: list[NonNegativeInt] | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # Cross-field checks raise APIError, which msgspec lets through, to name the param.
        if self.top_k is not None and self.top_k < -1:
            raise bad_request("`top_k` must be -1 or 0 (off) or a positive number", "top_k")
        for key in self.logit_bias or {}:
            if not (key.isascii() and key.isdigit()):
                raise bad_request(f"`logit_bias` keys must be token ids, got {key!r}", "logit_bias")


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """OpenAI's chat completion request, with vLLM's and LMDeploy's sampling extensions."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobsCount | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("`top_logprobs` requires `logprobs` to be true", "top_logprobs")


class CompletionRequest(SamplingFields, kw_only=True):
    """OpenAI's (legacy) text completion request, with vLLM's and LMDeploy's extensions."""

    # One prompt, or a batch: strings, one list of token ids, or lists of token ids.
    # (msgspec allows one array type per union, so the batch forms are checked below.)
    prompt: str | list[str | int | list[int]]
    echo: bool | None = None
    logprobs: TopLogprobsCount | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        completion_prompts(self)  # raises a 400 on an empty or mixed batch


# ---- generation responses --------------------------------------------------------------------


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[ChatTokenLogprob] | None = None


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class Usage(msgspec.Struct, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    details = PromptTokensDetails(cached_tokens=cached_tokens) if cached_tokens else None
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=details,
    )


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a chunk adds: `role` on a choice's first chunk, `content` when there is text."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One `data:` event of a streamed chat completion.

    `usage` is null except on the last chunk when `stream_options.include_usage` is set;
    that chunk has no choices.
    """

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    """OpenAI's legacy shape: parallel lists, one entry per token.

    With `echo`, the first prompt token has `null` logprob and top logprobs.
    """

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(msgspec.Struct, kw_only=True):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(msgspec.Struct, kw_only=True):
    """A /v1/completions answer, and also each streamed event (OpenAI uses one shape).

    Streamed events have `finish_reason: null` until a choice's last one; `usage` is null
    except on the last event when `stream_options.include_usage` is set.
    """

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- models ----------------------------------------------------------------------------------


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlmserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- tokenizer endpoints ---------------------------------------------------------------------


class EncodeRequest(msgspec.Struct, kw_only=True):
    """LMDeploy's /v1/encode."""

    input: str | list[str]
    do_preprocess: Annotated[
        bool, Meta(description="render the input as a user turn with the chat template first")
    ] = False
    add_bos: bool = True


class EncodeResponse(msgspec.Struct, kw_only=True):
    """For a string input: one id list and its length; for a list: one of each per input."""

    # (msgspec allows one array type per union, hence the loose item type.)
    input_ids: list[int | list[int]]
    length: int | list[int]


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's /tokenize: either `prompt` (plain text) or `messages` (rendered by the template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Annotated[
        bool, Meta(description="for `prompt`: add the tokenizer's BOS and the like")
    ] = True
    add_generation_prompt: Annotated[
        bool, Meta(description="for `messages`: end with the assistant turn's opening")
    ] = True

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("Send exactly one of `prompt` and `messages`", "prompt")


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[NonNegativeInt]


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str


# ---- decoding and mapping --------------------------------------------------------------------


@functools.cache
def _decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    return msgspec.json.Decoder(kind)


def decode_request(body: bytes, kind: type[T]) -> T:
    """Decode a JSON body into `kind`; any problem is an APIError (400) naming the field."""
    try:
        return _decoder(kind).decode(body)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise from_msgspec_error(exc) from None


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts, one per entry: each a string or a list of token ids."""
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


def stop_strings(req: SamplingFields) -> list[str]:
    """`stop` as a list; empty strings are dropped (they would match at once)."""
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return [s for s in stop if s]


def to_sampling_params(
    req: ChatCompletionRequest | CompletionRequest, default_max_tokens: int
) -> SamplingParams:
    """The engine's SamplingParams for a request.

    `default_max_tokens` is used when the request names no limit: what fits in the session
    after the prompt. Stop strings, `n`, `echo` and detokenization options stay with the
    frontend (see `stop_strings`).
    """
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        # Chat: `logprobs` switches them on, `top_logprobs` says how many alternatives.
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens = req.max_tokens
        logprobs = req.logprobs
    max_tokens = max_tokens or default_max_tokens
    min_tokens = req.min_tokens if req.min_tokens is not None else (req.min_new_tokens or 0)
    if min_tokens > max_tokens:
        raise bad_request(
            f"`min_tokens` ({min_tokens}) must not exceed `max_tokens` ({max_tokens})",
            "min_tokens",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),  # vLLM's -1 and our 0 both mean off
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        logprobs=logprobs,
        min_tokens=min_tokens,
        ignore_eos=req.ignore_eos,
        stop_token_ids=list(req.stop_token_ids or []),
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
    )
