"""What a chat request's `tools` and `tool_choice` mean for one answer, as vLLM serves them.

- `none`: the tools are still shown to the model (vLLM's default), the answer is text;
- `auto` (the default when there are tools): the model decides, and the server's
  `--tool-call-parser` reads its calls (no parser configured: a 400, as vLLM);
- a named function: the answer is constrained to that function's arguments (a JSON-schema
  grammar) and read as one call to it;
- `required`: the answer is constrained to a JSON array of `{"name", "parameters"}` calls, at
  least one (one at most with `parallel_tool_calls: false`), each read as a call.

The reasoning parser (`--reasoning-parser`) splits the thinking off first in every case.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from vlmserve.frontend.errors import bad_request
from vlmserve.frontend.generation import TextOptions
from vlmserve.frontend.output import OutputParser, PlainText, ReasoningThenAnswer
from vlmserve.frontend.reasoning import REASONING_PARSERS
from vlmserve.frontend.schemas import ChatCompletionRequest
from vlmserve.frontend.tool_parsers import TOOL_PARSERS
from vlmserve.frontend.tool_parsers.base import random_call_id
from vlmserve.frontend.tool_parsers.forced import NamedCall, RequiredCalls
from vlmserve.frontend.tool_parsers.mistral import mistral_call_id
from vlmserve.frontend.tool_schemas import ChatTool, FunctionDefinition, NamedToolChoice
from vlmserve.shared.grammars import GrammarError, to_xgrammar
from vlmserve.shared.messages import Grammar, SamplingParams

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """The chat template's `tools`, the grammar forcing calls (if any), and how each choice's
    text is read; `keeps_special_tokens` when the tool parser needs them in the text."""

    tools: list[dict[str, Any]] | None
    grammar: Grammar | None
    parser: Callable[[], OutputParser]
    keeps_special_tokens: bool = False

    def constrain(self, sampling: SamplingParams) -> SamplingParams:
        """`sampling` with the grammar that forces the calls; 400 when the request also
        constrains its output another way (`response_format` and the like)."""
        if self.grammar is None:
            return sampling
        if sampling.grammar is not None:
            raise bad_request(
                "a `tool_choice` that forces calls cannot be combined with `response_format` "
                "or structured outputs",
                "tool_choice",
            )
        return msgspec.structs.replace(sampling, grammar=self.grammar)

    def text_options(self, options: TextOptions) -> TextOptions:
        """`options`, keeping special tokens in the text when the tool parser reads them."""
        if not self.keeps_special_tokens:
            return options
        return dataclasses.replace(options, skip_special_tokens=False, hide_stop_token=True)


def plan_tools(req: ChatCompletionRequest, tool_parser: str, reasoning_parser: str) -> ToolPlan:
    """The plan for `req` on a server with these parsers (names; empty: none); 400 naming
    `tool_choice` when the choice cannot be served."""
    tools = req.tools or []
    choice = req.tool_choice or ("auto" if tools else "none")
    if choice != "none" and choice != "auto" and not tools:
        raise bad_request("`tool_choice` other than none and auto needs `tools`", "tool_choice")
    reasoning = REASONING_PARSERS[reasoning_parser] if reasoning_parser else None
    new_id = mistral_call_id if tool_parser == "mistral" else random_call_id
    grammar, keeps = None, False
    max_calls = 1 if req.parallel_tool_calls is False else None
    if isinstance(choice, NamedToolChoice):
        function = _named(tools, choice.function.name)
        grammar = _json_schema(function.parameters or EMPTY_PARAMETERS)
        answer = lambda: NamedCall(function.name, new_id)  # noqa: E731
    elif choice == "required":
        grammar = _json_schema(_calls_schema(tools, max_calls))
        answer = lambda: RequiredCalls(new_id)  # noqa: E731
    elif choice == "auto" and tools:
        if not tool_parser:
            raise bad_request(
                '`tool_choice: "auto"` (the default with `tools`) needs the server started '
                "with --tool-call-parser; send tool_choice none, required or a function",
                "tool_choice",
            )
        parser_cls = TOOL_PARSERS[tool_parser]
        keeps = parser_cls.keeps_special_tokens
        answer = lambda: parser_cls(new_id)  # noqa: E731
    else:
        answer = PlainText

    def parser() -> OutputParser:
        return ReasoningThenAnswer(reasoning() if reasoning else None, answer(), max_calls)

    return ToolPlan(template_tools(tools) if tools else None, grammar, parser, keeps)


def template_tools(tools: list[ChatTool]) -> list[dict[str, Any]]:
    """The tools as chat templates take them (OpenAI's shape, unset fields left out)."""
    out = []
    for tool in tools:
        function = {"name": tool.function.name}
        if tool.function.description is not None:
            function["description"] = tool.function.description
        function["parameters"] = tool.function.parameters or EMPTY_PARAMETERS
        out.append({"type": "function", "function": function})
    return out


def _named(tools: list[ChatTool], name: str) -> FunctionDefinition:
    for tool in tools:
        if tool.function.name == name:
            return tool.function
    names = ", ".join(t.function.name for t in tools)
    message = f"`tool_choice` names {name!r}, which is not in `tools` ({names})"
    raise bad_request(message, "tool_choice")


def _calls_schema(tools: list[ChatTool], max_calls: int | None) -> dict[str, Any]:
    """vLLM's schema for `required`: an array of calls, each one of the tools by name with its
    parameters; the tools' `$defs` are gathered at the top, where their `$ref`s point."""
    defs: dict[str, Any] = {}
    items = []
    for tool in tools:
        parameters = dict(tool.function.parameters or EMPTY_PARAMETERS)
        defs.update(parameters.pop("$defs", {}))
        items.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": items},
    }
    if max_calls is not None:
        schema["maxItems"] = max_calls
    if defs:
        schema["$defs"] = defs
    return schema


def _json_schema(schema: dict[str, Any]) -> Grammar:
    """The grammar of `schema`; a 400 naming `tools` when a tool's parameters are no schema
    the grammar engine takes."""
    grammar = Grammar(kind="json_schema", spec=json.dumps(schema))
    try:
        to_xgrammar(grammar)
    except GrammarError as exc:
        message = f"a tool's `parameters` is not a usable JSON schema: {exc}"
        raise bad_request(message, "tools") from None
    return grammar
