"""OpenAI's tool-calling request fields: `tools`, `tool_choice`, and the tool calls of earlier
assistant turns. Imported by frontend/schemas.py, which holds the messages and requests."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# OpenAI's rule for function names.
FunctionName = Annotated[str, Meta(pattern="^[a-zA-Z0-9_.-]{1,64}$")]


class FunctionDefinition(msgspec.Struct, kw_only=True):
    name: FunctionName
    description: str | None = None
    parameters: Annotated[
        dict[str, Any] | None, Meta(description="the arguments' JSON schema (an object)")
    ] = None
    strict: bool | None = None


class ChatTool(msgspec.Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    """Call this function (its arguments are then enforced by a grammar)."""

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Annotated[
    Literal["none", "auto", "required"] | NamedToolChoice,
    Meta(
        description="none: answer in text; auto (the default with tools): the model decides "
        "(needs --tool-call-parser); required: at least one call; or the function to call"
    ),
]


class FunctionCallParam(msgspec.Struct, kw_only=True):
    name: str
    arguments: Annotated[str, Meta(description="the call's arguments as a JSON object")]


class ToolCallParam(msgspec.Struct, kw_only=True):
    """A call an earlier assistant turn made; a `tool` message answers it by its `id`."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam
