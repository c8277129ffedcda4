"""A request's output constraint: the one Grammar its structured-output fields ask for.

OpenAI's `response_format` (`text`, `json_object`, `json_schema`), LMDeploy's `regex_schema`
form of it, vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`)
and its older `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar` all become a
`Grammar` in SamplingParams; the workers turn it into token masks (workers/grammar.py). At most
one of them may be given. Each grammar is built once here with xgrammar (cached by its spec), so
a schema, regular expression or grammar xgrammar cannot take is a 400 naming the field, before
anything reaches the engine.
"""

from __future__ import annotations

import functools
import json

import msgspec

from vlmserve.frontend.errors import APIError, bad_request
from vlmserve.frontend.structured_output_schemas import (
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ResponseFormatRegex,
    ResponseFormatText,
    StructuredOutputs,
)
from vlmserve.shared.grammars import to_xgrammar
from vlmserve.shared.messages import Grammar

ANY_OBJECT = Grammar("json_object")
WHAT = {
    "json_schema": "JSON schema",
    "json_object": "JSON object grammar",
    "regex": "regular expression",
    "choice": "choice list",
    "ebnf": "EBNF grammar",
}


def grammar_for(req: object) -> Grammar | None:
    """The Grammar the request's fields ask for (checked), or None for free text.

    `req` is a chat or completion request (frontend/schemas.py SamplingFields).
    """
    found = requested_grammars(req)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(f"`{name}`" for name, _ in found)
        raise bad_request(f"give at most one output constraint; got {names}", found[1][0])
    field, grammar = found[0]
    check(grammar, field)
    return grammar


def requested_grammars(req: object) -> list[tuple[str, Grammar]]:
    """Every output constraint the request gives, with the field that gave it."""
    found: list[tuple[str, Grammar]] = []
    match getattr(req, "response_format", None):
        case ResponseFormatJSONObject():
            found.append(("response_format", ANY_OBJECT))
        case ResponseFormatJSONSchema(json_schema=spec):
            schema = spec.schema
            grammar = ANY_OBJECT if schema is None else json_schema(schema, "response_format")
            found.append(("response_format", grammar))
        case ResponseFormatRegex(regex_schema=regex):
            found.append(("response_format", Grammar("regex", regex)))
    outputs = getattr(req, "structured_outputs", None)
    if outputs is not None:
        found += _structured_outputs(outputs)
    guided = [
        ("guided_json", getattr(req, "guided_json", None), "json_schema"),
        ("guided_regex", getattr(req, "guided_regex", None), "regex"),
        ("guided_choice", getattr(req, "guided_choice", None), "choice"),
        ("guided_grammar", getattr(req, "guided_grammar", None), "ebnf"),
    ]
    for field, value, kind in guided:
        if value is not None:
            found.append((field, _grammar(kind, value, field)))
    return found


def _structured_outputs(outputs: StructuredOutputs) -> list[tuple[str, Grammar]]:
    field = "structured_outputs"
    given = [
        _grammar(kind, value, field)
        for kind, value in [
            ("json_schema", outputs.json),
            ("regex", outputs.regex),
            ("choice", outputs.choice),
            ("ebnf", outputs.grammar),
        ]
        if value is not None
    ]
    if outputs.json_object:
        given.append(ANY_OBJECT)
    if len(given) > 1:
        raise bad_request("`structured_outputs` may set only one of its constraints", field)
    return [(field, grammar) for grammar in given]


def _grammar(kind: str, value: object, field: str) -> Grammar:
    if kind == "json_schema":
        return json_schema(value, field)
    if kind == "choice":
        return Grammar("choice", json.dumps(value, ensure_ascii=False))
    return Grammar(kind, value)  # type: ignore[arg-type]


def json_schema(schema: object, field: str) -> Grammar:
    """A json_schema Grammar from a schema object or its JSON text (one canonical text, the
    properties kept in their order: it is the order the output writes them in)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise bad_request(f"`{field}`: the JSON schema is not JSON: {exc}", field) from None
    if not isinstance(schema, dict | bool):
        raise bad_request(f"`{field}`: a JSON schema is an object", field)
    return Grammar("json_schema", msgspec.json.encode(schema).decode())


def check(grammar: Grammar, field: str) -> None:
    """400 naming `field` when xgrammar cannot build `grammar`."""
    error = _build_error(grammar)
    if error is not None:
        raise bad_request(f"`{field}` is not a valid {WHAT[grammar.kind]}: {error}", field)


@functools.lru_cache(maxsize=1024)
def _build_error(grammar: Grammar) -> str | None:
    """Why xgrammar cannot build `grammar`, or None; one build per distinct grammar.

    The first call imports xgrammar (with torch, about a second; routes call this off the
    event loop). Any failure of a client's spec is the client's 400, not a 500.
    """
    try:
        to_xgrammar(grammar)
    except APIError:
        raise
    except Exception as exc:  # GrammarError, and whatever else a fuzzed spec may raise
        return str(exc) or type(exc).__name__
    return None


def require_chat_template(req: object, has_template: bool) -> None:
    """A chat request's `response_format` needs the model's chat template: the constraint
    is on the assistant's answer, which only a rendered chat has."""
    if has_template:
        return
    fmt = getattr(req, "response_format", None)
    if fmt is not None and not isinstance(fmt, ResponseFormatText):
        raise bad_request(
            "this model has no chat template, so `response_format` cannot apply to a chat "
            "answer: use /v1/completions with `response_format`",
            "response_format",
        )
