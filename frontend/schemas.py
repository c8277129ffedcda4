"""OpenAI request and response bodies as msgspec Structs: the source of /openapi.json.

Only the shapes live here; checks across fields are `frontend/validation.py`'s (run by the
`__post_init__` hooks below) and the mapping to the engine's SamplingParams is
`frontend/sampling_params.py`'s.

Requests are decoded strictly by type and `Meta` constraints (a bad body is a 400 naming
the field) but unknown fields are ignored, because clients send extras (`session_id`,
`tools: []`, ...) that we do not serve. Optional request fields accept `null`, as OpenAI's
do. Response field names and nullability follow the `openai` Python package's types: a
chunk's `finish_reason` and a choice's `logprobs` are sent as `null`, not left out.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from vlmserve.frontend import validation
from vlmserve.frontend.structured_output_schemas import (
    Choices,
    JSONSchemaDict,
    ResponseFormat,
    StructuredOutputs,
)
from vlmserve.frontend.tool_schemas import ChatTool, ToolCallParam, ToolChoice

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
RequestTimeoutSeconds = Annotated[
    float,
    Meta(
        gt=0.0,
        le=604800.0,
        description="seconds the request may take in all (default: the server's "
        "--request-timeout); past it the answer is a 408 error (a stream's last event)",
    ),
]

FinishReason = Literal["stop", "length"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]

# ---- chat messages ---------------------------------------------------------------------------


class ImageURL(msgspec.Struct, kw_only=True):
    url: Annotated[str, Meta(description="http(s) URL, or a data: URL with base64 image bytes")]
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    text: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url", kw_only=True):
    # A bare string is the URL; LMDeploy and some clients send it that way.
    image_url: ImageURL | str


VideoFPS = Annotated[
    float, Meta(gt=0.0, le=120.0, description="frames sampled per second (default: --video-fps)")
]
VideoMaxFrames = Annotated[
    int, Meta(ge=1, description="most frames sampled (at most --video-max-frames)")
]


class VideoURL(msgspec.Struct, kw_only=True):
    url: Annotated[str, Meta(description="http(s) URL, or a data: URL with base64 video bytes")]
    fps: VideoFPS | None = None
    max_frames: VideoMaxFrames | None = None


PixelCount = Annotated[int, Meta(ge=1, le=2**40)]


class MMProcessorKwargs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's per-request processor settings: how every video of the request is sampled (a
    video part's own `fps` / `max_frames` win) and, for the Qwen-VL family, the pixel bounds
    its images (and Qwen2/2.5-VL's video frames) are resized within. Other keys are refused,
    not ignored."""

    fps: VideoFPS | None = None
    max_frames: VideoMaxFrames | None = None
    min_pixels: Annotated[
        PixelCount | None,
        Meta(description="Qwen-VL: fewest pixels an image is resized to (at most --mm-max-pixels)"),
    ] = None
    max_pixels: Annotated[
        PixelCount | None,
        Meta(description="Qwen-VL: most pixels an image is resized to (at most --mm-max-pixels)"),
    ] = None


class VideoPart(msgspec.Struct, tag_field="type", tag="video_url", kw_only=True):
    video_url: VideoURL | str


ContentPart = TextPart | ImagePart | VideoPart


# One class per role, told apart by `role` (as OpenAI's own document does), so the schema says
# what is required of each: system and user turns need `content`, an assistant turn may leave
# it out; a tool turn answers one of its calls. (Legacy `function` messages are not served.)


class SystemChatMessage(msgspec.Struct, tag_field="role", tag="system", kw_only=True):
    content: str | list[ContentPart]
    name: str | None = None


class UserChatMessage(msgspec.Struct, tag_field="role", tag="user", kw_only=True):
    content: str | list[ContentPart]
    name: str | None = None


class AssistantChatMessage(msgspec.Struct, tag_field="role", tag="assistant", kw_only=True):
    """An earlier answer; its `content` may be left out (the turn is then rendered empty)."""

    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None


# One turn of the conversation; /openapi.json names this union `ChatMessage`.
class ToolChatMessage(msgspec.Struct, tag_field="role", tag="tool", kw_only=True):
    """A tool's result, answering call `tool_call_id` of an earlier assistant turn: text (as
    a string or text parts; the union keeps each part's `type` required)."""

    content: str | list[ContentPart]
    tool_call_id: str

    def __post_init__(self) -> None:
        media = (ImagePart, VideoPart)
        if isinstance(self.content, list) and any(isinstance(p, media) for p in self.content):
            raise ValueError("a tool message's content is text only")


ChatMessage = SystemChatMessage | UserChatMessage | AssistantChatMessage | ToolChatMessage


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
        LogitBias | None,
        Meta(
            description="token id (as a string) -> bias added to its logit",
            # check_sampling_fields: the keys are token ids.
            extra_json_schema={"propertyNames": {"pattern": "^[0-9]+$"}},
        ),
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
    bad_words: Annotated[
        list[str] | None,
        Meta(description="vLLM's: words the output must not contain (as whole token sequences)"),
    ] = None
    prompt_logprobs: Annotated[
        TopLogprobsCount | None,
        Meta(
            description="vLLM's: each prompt token's logprob given the tokens before it, with "
            "the N most likely tokens at each position (not with `stream`)"
        ),
    ] = None
    include_stop_str_in_output: bool = False
    # Output constraints (frontend/structured_output.py): at most one of these.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Annotated[JSONSchemaDict | str | None, Meta(description="vLLM's")] = None
    guided_regex: Annotated[str | None, Meta(description="vLLM's")] = None
    guided_choice: Annotated[Choices | None, Meta(description="vLLM's")] = None
    guided_grammar: Annotated[str | None, Meta(description="vLLM's (EBNF)")] = None
    timeout: RequestTimeoutSeconds | None = None

    def __post_init__(self) -> None:
        validation.check_sampling_fields(self)


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """OpenAI's chat completion request, with vLLM's and LMDeploy's sampling extensions."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobsCount | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        validation.check_chat_request(self)


class CompletionRequest(SamplingFields, kw_only=True):
    """OpenAI's (legacy) text completion request, with vLLM's and LMDeploy's extensions."""

    # One prompt, or a batch: strings, one list of token ids, or lists of token ids.
    # (msgspec allows one array type per union, so the batch forms are checked below.)
    prompt: str | list[str | int | list[int]]
    echo: bool | None = None
    logprobs: TopLogprobsCount | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        validation.completion_prompts(self)  # raises a 400 on an empty or mixed batch


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


class PromptLogprob(msgspec.Struct):
    """vLLM's entry of one token at one prompt position (`rank` 1 is the most likely)."""

    logprob: float
    rank: int
    decoded_token: str


# vLLM's `prompt_logprobs`: per prompt token, null for the first, then token id -> its entry.
PromptLogprobsList = list[
    Annotated[
        dict[int, PromptLogprob],
        Meta(
            description="the prompt token's entry, then the top N's (token id -> entry)",
            extra_json_schema={"propertyNames": {"pattern": "^[0-9]+$"}},
        ),
    ]
    | None
]


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


class ChatFunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: Annotated[str, Meta(description="the call's arguments as a JSON object")]


class ChatToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: ChatFunctionCall


class AssistantMessage(msgspec.Struct, kw_only=True):
    """The answer. `reasoning_content` and `tool_calls` are there only when the server's
    output parsers found reasoning or tool calls in it."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET
    tool_calls: list[ChatToolCall] | UnsetType = UNSET


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # Sent when the request asks for them (`prompt_logprobs`), as vLLM does.
    prompt_logprobs: PromptLogprobsList | UnsetType = UNSET


class ChatFunctionCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ChatToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A piece of tool call `index`: the first has its `id`, `type` and function `name`; the
    rest carry more of its `arguments`."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChatFunctionCallDelta | None = None


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a chunk adds: `role` on a choice's first chunk, `content` when there is text,
    `reasoning_content` and `tool_calls` when the server's output parsers find them."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ChatToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


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
    # Sent when the request asks for them (`prompt_logprobs`, not streamed), as vLLM does.
    prompt_logprobs: PromptLogprobsList | UnsetType = UNSET


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
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] | None = None
    add_special_tokens: Annotated[
        bool, Meta(description="for `prompt`: add the tokenizer's BOS and the like")
    ] = True
    add_generation_prompt: Annotated[
        bool, Meta(description="for `messages`: end with the assistant turn's opening")
    ] = True

    def __post_init__(self) -> None:
        validation.check_tokenize_request(self)


# What /openapi.json adds to a struct's schema where a rule that the types cannot say is part
# of the API; each is enforced by frontend/validation.py (named beside it). Rules about one
# field sit under `dependentSchemas` (they apply when the field is sent), where generators of
# client code leave them alone.
_LOGPROBS_REQUIRED = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
_ONE_OR_MORE = {"type": "array", "minItems": 1}
# check_sampling_fields: `prompt_logprobs` above 0 are not streamed (as in vLLM).
_PROMPT_LOGPROBS_NOT_STREAMED = {
    "if": {"properties": {"prompt_logprobs": {"type": "integer", "minimum": 1}}},
    "then": {"properties": {"stream": {"const": False}}},
}
SCHEMA_RULES: dict[str, dict] = {
    # check_tokenize_request: exactly one of `prompt` and `messages` (null counts as left out).
    "TokenizeRequest": {
        "if": {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
        "then": {"properties": {"prompt": {"type": "null"}}},
        "else": {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    },
    # check_chat_request: `top_logprobs` above 0 needs `logprobs: true`.
    "ChatCompletionRequest": {
        "dependentSchemas": {
            "top_logprobs": {
                "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
                "then": _LOGPROBS_REQUIRED,
            },
            "prompt_logprobs": _PROMPT_LOGPROBS_NOT_STREAMED,
        }
    },
    "CompletionRequest": {
        "dependentSchemas": {
            # completion_prompts: one string, or a non-empty batch of one kind.
            "prompt": {
                "properties": {
                    "prompt": {
                        "anyOf": [
                            {"type": "string"},
                            _ONE_OR_MORE | {"items": {"type": "string"}},
                            _ONE_OR_MORE | {"items": {"type": "integer"}},
                            _ONE_OR_MORE | {"items": _ONE_OR_MORE | {"items": {"type": "integer"}}},
                        ]
                    }
                }
            },
            "prompt_logprobs": _PROMPT_LOGPROBS_NOT_STREAMED,
        }
    },
}


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[NonNegativeInt]


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str
