"""The OpenAPI 3.1 document of the HTTP API, built from the msgspec schemas.

The schemas in `frontend/schemas.py` are what requests are decoded with, so the document
cannot drift from what the server accepts. Swagger UI for it is served from
`STATIC_DIR` (`/static/swagger/...`, page `/static/docs.html`), so it works offline.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec

from vlmserve.frontend import schemas as s
from vlmserve.frontend.errors import ErrorResponse

STATIC_DIR = Path(__file__).parent / "static"
DOCS_PAGE = STATIC_DIR / "docs.html"
REF = "#/components/schemas/{name}"

# Reusable error responses: status -> (component name, when it happens).
ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "The body is not valid: `param` names the field."),
    401: ("Unauthorized", "Missing or wrong API key (when the server has keys)."),
    404: ("NotFound", "Unknown model (code `model_not_found`) or path."),
    408: ("RequestTimeout", "The request ran past its `timeout` (or the server's default)."),
    413: ("ContentTooLarge", "The request body is too large."),
    503: (
        "ServiceUnavailable",
        "The engine is not running or not ready, the server is overloaded (a full queue, a "
        "queue timeout, its concurrency cap) or shutting down; retry after `Retry-After`.",
    ),
}
GENERATE_ERRORS = (400, 401, 404, 408, 413, 503)
TOKENIZER_ERRORS = (400, 401, 404, 413)
# Unions that clients should see as one named type (msgspec writes a union inline where used).
# Unnamed, openapi-generator names a union after the first schema using it (a user message's
# content parts became `SystemChatMessageContentAnyOfInner`).
NAMED_UNIONS: dict[str, Any] = {"ChatMessage": s.ChatMessage, "ContentPart": s.ContentPart}


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    request: type | None = None
    response: type | None = None
    stream_chunk: type | None = None  # the `data:` payload when `stream` is true
    errors: tuple[int, ...] = (401,)
    public: bool = False  # no API key needed


# operationIds are part of the API: generated clients name their methods after them.
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        method="get",
        path="/v1/models",
        operation_id="listModels",
        summary="List the served model",
        tag="Models",
        response=s.ModelList,
    ),
    Operation(
        method="post",
        path="/v1/chat/completions",
        operation_id="createChatCompletion",
        summary="Create a chat completion (text and images in, text out)",
        tag="Chat",
        request=s.ChatCompletionRequest,
        response=s.ChatCompletion,
        stream_chunk=s.ChatCompletionChunk,
        errors=GENERATE_ERRORS,
    ),
    Operation(
        method="post",
        path="/v1/completions",
        operation_id="createCompletion",
        summary="Create a text completion",
        tag="Completions",
        request=s.CompletionRequest,
        response=s.Completion,
        stream_chunk=s.Completion,
        errors=GENERATE_ERRORS,
    ),
    Operation(
        method="post",
        path="/v1/encode",
        operation_id="encode",
        summary="Tokenize text (LMDeploy's API)",
        tag="Tokenizer",
        request=s.EncodeRequest,
        response=s.EncodeResponse,
        errors=TOKENIZER_ERRORS,
    ),
    Operation(
        method="post",
        path="/tokenize",
        operation_id="tokenize",
        summary="Tokenize a prompt or chat messages (vLLM's API)",
        tag="Tokenizer",
        request=s.TokenizeRequest,
        response=s.TokenizeResponse,
        errors=TOKENIZER_ERRORS,
    ),
    Operation(
        method="post",
        path="/detokenize",
        operation_id="detokenize",
        summary="Turn token ids back into text (vLLM's API)",
        tag="Tokenizer",
        request=s.DetokenizeRequest,
        response=s.DetokenizeResponse,
        errors=TOKENIZER_ERRORS,
    ),
    Operation(
        method="get",
        path="/health",
        operation_id="health",
        summary="200 when the engine is up, 503 when it is not",
        tag="Server",
        errors=(503,),
        public=True,
    ),
)


def _examples(model_name: str) -> dict[type, dict[str, Any]]:
    """Request bodies that "Try it out" in Swagger UI starts from."""
    return {
        s.ChatCompletionRequest: {
            "model": model_name,
            "messages": [{"role": "user", "content": "Say hello in three languages."}],
            "max_tokens": 64,
        },
        s.CompletionRequest: {"model": model_name, "prompt": "Once upon a time", "max_tokens": 32},
        s.EncodeRequest: {"input": "Hello, world!"},
        s.TokenizeRequest: {"model": model_name, "prompt": "Hello, world!"},
        s.DetokenizeRequest: {"model": model_name, "tokens": [1, 2, 3]},
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(
    op: Operation, refs: dict[type, dict], examples: dict[type, dict], secured: bool
) -> dict:
    ok: dict[str, Any] = {"description": "OK"}
    if op.response is not None:
        ok["content"] = _json(refs[op.response])
    if op.stream_chunk is not None:
        name = op.stream_chunk.__name__
        ok["description"] = f"OK. With `stream: true`, server-sent events instead (see {name})."
        # OpenAPI 3.1 has no schema for a whole event stream: `schema` describes one event.
        ok["content"]["text/event-stream"] = {"schema": {"$ref": REF.format(name=name + "Event")}}
    # Without API keys nothing answers 401.
    errors = [code for code in op.errors if secured or code != 401]
    operation: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": {"200": ok}
        | {str(code): {"$ref": f"#/components/responses/{ERRORS[code][0]}"} for code in errors},
    }
    if op.request is not None:
        body = _json(refs[op.request])
        if op.request in examples:
            body["application/json"]["example"] = examples[op.request]
        operation["requestBody"] = {"required": True, "content": body}
    if op.public and secured:
        operation["security"] = []
    return operation


def _event_schema(chunk: str) -> dict[str, Any]:
    """One server-sent event of a streamed answer: its `data` is a `chunk` as JSON, or the
    closing `[DONE]`, or an ErrorResponse as JSON when the stream fails after it began."""
    payload = {
        "anyOf": [{"$ref": REF.format(name=chunk)}, {"$ref": REF.format(name="ErrorResponse")}]
    }
    return {
        "title": chunk + "Event",
        "description": (
            f"One server-sent event: `data: <{chunk} as JSON>` per step, then `data: [DONE]`. "
            "An error during the stream is sent as `data: <ErrorResponse as JSON>`, and the "
            "stream ends there."
        ),
        "type": "object",
        "properties": {
            "data": {
                "type": "string",
                "if": {"not": {"const": "[DONE]"}},
                "then": {"contentMediaType": "application/json", "contentSchema": payload},
            }
        },
        "required": ["data"],
    }


def _version() -> str:
    try:
        return metadata.version("vlmserve")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "0.0.0"


def _replaced(node: Any, old: dict, new: dict) -> Any:
    """`node` with every sub-schema equal to `old` replaced by `new`."""
    if node == old:
        return new
    if isinstance(node, dict):
        return {key: _replaced(value, old, new) for key, value in node.items()}
    if isinstance(node, list):
        return [_replaced(item, old, new) for item in node]
    return node


def _components(types: list[type]) -> tuple[list[dict], dict[str, Any]]:
    """The schemas of `types` (references) and the components they refer to, with the named
    unions as components of their own and the rules across fields (schemas.SCHEMA_RULES)."""
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    for name, union in NAMED_UNIONS.items():
        (inline,), _ = msgspec.json.schema_components([union], ref_template=REF)
        components = _replaced(components, inline, {"$ref": REF.format(name=name)})
        components[name] = inline
    for name, rule in s.SCHEMA_RULES.items():
        components[name] = components[name] | rule
    return schemas, components


def openapi_spec(model_name: str, secured: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server that serves `model_name`; `secured`: the server
    has API keys, so every route but the public ones takes a bearer token (else none does)."""
    types: list[type] = [ErrorResponse]
    for op in OPERATIONS:
        types += [t for t in (op.request, op.response, op.stream_chunk) if t and t not in types]
    schemas, components = _components(types)
    for chunk in sorted({op.stream_chunk.__name__ for op in OPERATIONS if op.stream_chunk}):
        components[chunk + "Event"] = _event_schema(chunk)
    refs = dict(zip(types, schemas, strict=True))
    examples = _examples(model_name)

    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs, examples, secured)

    spec = {
        "openapi": "3.1.0",
        "info": {
            "title": "vlmserve",
            "version": _version(),
            "description": (
                f"OpenAI-compatible API serving `{model_name}`. Send the model name as "
                '`model`; errors use OpenAI\'s shape `{"error": {message, type, param, code}}`.'
            ),
        },
        "tags": [{"name": tag} for tag in dict.fromkeys(op.tag for op in OPERATIONS)],
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {
                name: {"description": text, "content": _json(refs[ErrorResponse])}
                for code, (name, text) in ERRORS.items()
                if secured or code != 401
            },
        },
    }
    if secured:
        spec["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearerAuth": []}]
    return spec
