"""The OpenAPI document: valid 3.1, stable names, every reference resolves, security only with
API keys, request schemas that accept exactly what the handlers' decoders accept; docs assets
ship."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import msgspec
import pytest
from openapi_spec_validator import validate

from vlmserve.frontend import schemas as s
from vlmserve.frontend.errors import APIError
from vlmserve.frontend.openapi import DOCS_PAGE, STATIC_DIR, openapi_spec
from vlmserve.frontend.validation import decode_request

# Generated clients name their methods after these: renaming one breaks every program built
# on a generated client. (test_clients checks the live server's document against it too.)
OPERATION_IDS = {
    ("GET", "/v1/models"): "listModels",
    ("POST", "/v1/chat/completions"): "createChatCompletion",
    ("POST", "/v1/completions"): "createCompletion",
    ("POST", "/v1/encode"): "encode",
    ("POST", "/tokenize"): "tokenize",
    ("POST", "/detokenize"): "detokenize",
    ("GET", "/health"): "health",
}


def as_served(secured: bool) -> dict[str, Any]:
    # Through JSON, as clients get it: the document must survive encoding.
    return msgspec.json.decode(msgspec.json.encode(openapi_spec("tiny-vlm", secured=secured)))


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """The document of a server with API keys."""
    return as_served(secured=True)


@pytest.fixture(scope="module")
def open_spec() -> dict[str, Any]:
    """The document of a server without API keys."""
    return as_served(secured=False)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_spec_is_valid_openapi_3_1(spec: dict[str, Any], open_spec: dict[str, Any]) -> None:
    for document in (spec, open_spec):
        assert document["openapi"] == "3.1.0"
        validate(document)


def test_operation_ids_are_stable_and_unique(spec: dict[str, Any]) -> None:
    ids = {
        (method.upper(), path): op["operationId"]
        for path, item in spec["paths"].items()
        for method, op in item.items()
    }
    assert ids == OPERATION_IDS


def test_every_ref_resolves(spec: dict[str, Any]) -> None:
    found = set(refs(spec))
    assert "#/components/schemas/ChatCompletionRequest" in found
    for ref in found:
        assert isinstance(resolve(spec, ref), dict), ref


def test_schema_names_are_stable(spec: dict[str, Any]) -> None:
    # Generated clients name their types after these; renaming one breaks them.
    names = set(spec["components"]["schemas"])
    assert {
        "ChatCompletionRequest",
        "ChatCompletion",
        "ChatCompletionChunk",
        "CompletionRequest",
        "Completion",
        "ModelList",
        "ModelCard",
        "Usage",
        "ErrorResponse",
        "EncodeRequest",
        "EncodeResponse",
        "TokenizeRequest",
        "TokenizeResponse",
        "DetokenizeRequest",
        "DetokenizeResponse",
    } <= names


def test_generation_documents_streaming_and_errors(spec: dict[str, Any]) -> None:
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    content = chat["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    event = resolve(spec, content["text/event-stream"]["schema"]["$ref"])
    assert event["required"] == ["data"] and "ChatCompletionChunk" in event["description"]
    assert {"400", "401", "404", "413", "503"} <= set(chat["responses"])
    error = resolve(spec, chat["responses"]["400"]["$ref"])
    assert error["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert chat["requestBody"]["content"]["application/json"]["example"]["model"] == "tiny-vlm"


def test_security_is_bearer_except_health(spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert "401" in spec["paths"]["/v1/models"]["get"]["responses"]


def test_without_api_keys_no_security_is_declared(open_spec: dict[str, Any]) -> None:
    # A server without --api-keys takes every request: a document that asks for a bearer
    # token would make generated clients demand one.
    assert "security" not in open_spec
    assert "securitySchemes" not in open_spec["components"]
    assert "Unauthorized" not in open_spec["components"]["responses"]
    for path, item in open_spec["paths"].items():
        for method, op in item.items():
            assert "security" not in op, (method, path)
            assert "401" not in op["responses"], (method, path)
    assert "401" not in msgspec.json.encode(open_spec["paths"]).decode()


def test_request_constraints_reach_the_document(spec: dict[str, Any]) -> None:
    props = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    temperature = props["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0.0, 2.0)
    assert spec["components"]["schemas"]["ChatCompletionRequest"]["required"] == ["messages"]


def schema_verdict(spec: dict[str, Any], name: str, body: object) -> bool:
    """Whether the document's schema `name` accepts `body`."""
    root = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    return jsonschema.Draft202012Validator(root).is_valid(body)


def handler_verdict(kind: type, body: object) -> bool:
    """Whether the route's decoder (schema types, constraints and cross-field checks) does."""
    try:
        decode_request(msgspec.json.encode(body), kind)
    except APIError as err:
        assert err.status == 400
        return False
    return True


USER = {"role": "user", "content": "hi"}
TOKENIZE_BODIES = [
    {}, {"prompt": "x"}, {"prompt": ""}, {"messages": [USER]}, {"messages": []},
    {"prompt": "x", "messages": [USER]}, {"prompt": None, "messages": [USER]},
    {"prompt": "x", "messages": None}, {"prompt": None}, {"prompt": None, "messages": None},
    {"prompt": 5}, {"messages": [{"role": "user"}]}, {"messages": [{"role": "assistant"}]},
    {"messages": [{"role": "system", "content": None}]}, {"prompt": "x", "messages": []},
    {"prompt": "x", "model": None, "add_special_tokens": False},
]  # fmt: skip
CHAT_MESSAGES = [
    [USER], [], [{"role": "user"}], [{"role": "user", "content": None}],
    [{"role": "system", "content": "be brief"}, USER], [{"role": "system"}],
    [{"role": "assistant"}], [{"role": "assistant", "content": None}, USER],
    [{"role": "tool", "content": "x"}], [{"content": "x"}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x/y.png"}]}],
    [{"role": "user", "content": [{"type": "audio"}]}],
]  # fmt: skip


@pytest.mark.parametrize("body", TOKENIZE_BODIES)
def test_tokenize_schema_accepts_what_the_handler_accepts(
    open_spec: dict[str, Any], body: dict
) -> None:
    assert schema_verdict(open_spec, "TokenizeRequest", body) == handler_verdict(
        s.TokenizeRequest, body
    )


@pytest.mark.parametrize("messages", CHAT_MESSAGES)
def test_chat_messages_schema_accepts_what_the_handler_accepts(
    open_spec: dict[str, Any], messages: list
) -> None:
    body = {"messages": messages}
    assert schema_verdict(open_spec, "ChatCompletionRequest", body) == handler_verdict(
        s.ChatCompletionRequest, body
    )


CHAT_BODIES = [
    {"top_logprobs": 2}, {"top_logprobs": 2, "logprobs": True}, {"top_logprobs": 0},
    {"top_logprobs": 2, "logprobs": False}, {"top_logprobs": None}, {"logprobs": True},
    {"n": 2.0}, {"n": 2.5}, {"max_tokens": 1e3}, {"seed": -3.0}, {"temperature": 1},
    {"logit_bias": {"12": 1}}, {"logit_bias": {"": 1}}, {"logit_bias": {"x1": 1}},
    {"logit_bias": {"1": 1.0, "2": 100}}, {"n": True}, {"max_tokens": "5"},
    {"prompt_logprobs": 2}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1},
    {"prompt_logprobs": 1, "stream": True}, {"prompt_logprobs": 0, "stream": True},
    {"prompt_logprobs": 1, "stream": False},
]  # fmt: skip
COMPLETION_BODIES = [
    {"prompt": "x"}, {"prompt": ""}, {"prompt": []}, {"prompt": ["a", "b"]}, {"prompt": [1, 2]},
    {"prompt": [[1], [2, 3]]}, {"prompt": ["a", 1]}, {"prompt": [[1], []]}, {"prompt": [[1], "a"]},
    {"prompt": [1.0, 2]}, {"prompt": "x", "echo": True},
    {"prompt": "x", "echo": True, "logprobs": 1}, {"prompt": "x", "echo": False, "logprobs": 1},
    {"prompt": "x", "echo": True, "logprobs": None},
    {"prompt": "x", "logprobs": 0}, {"prompt": "x", "logprobs": 21}, {},
    {"prompt": "x", "prompt_logprobs": 20}, {"prompt": "x", "prompt_logprobs": 2, "stream": True},
    {"prompt": "x", "prompt_logprobs": 0, "stream": True},
]  # fmt: skip


@pytest.mark.parametrize("fields", CHAT_BODIES)
def test_chat_schema_accepts_what_the_handler_accepts(
    open_spec: dict[str, Any], fields: dict
) -> None:
    body = {"messages": [USER]} | fields
    assert schema_verdict(open_spec, "ChatCompletionRequest", body) == handler_verdict(
        s.ChatCompletionRequest, body
    )


@pytest.mark.parametrize("body", COMPLETION_BODIES)
def test_completion_schema_accepts_what_the_handler_accepts(
    open_spec: dict[str, Any], body: dict
) -> None:
    assert schema_verdict(open_spec, "CompletionRequest", body) == handler_verdict(
        s.CompletionRequest, body
    )


def test_chat_message_content_is_required_for_system_and_user(open_spec: dict[str, Any]) -> None:
    schemas = open_spec["components"]["schemas"]
    assert schemas["ChatMessage"]["discriminator"]["propertyName"] == "role"
    assert "content" in schemas["UserChatMessage"]["required"]
    assert "content" in schemas["SystemChatMessage"]["required"]
    assert "content" not in schemas["AssistantChatMessage"]["required"]
    messages = schemas["ChatCompletionRequest"]["properties"]["messages"]
    assert messages["items"] == {"$ref": "#/components/schemas/ChatMessage"}


@pytest.mark.parametrize(
    ("data", "valid"),
    [
        ("[DONE]", True),
        ('{"id": "c", "created": 1, "model": "m", "choices": []}', True),
        ('{"error": {"message": "engine gone", "type": "x", "param": null, "code": null}}', True),
        ('{"id": "c"}', False),
        ("DONE", False),
    ],
)
def test_a_streamed_event_is_described_with_its_payload(
    spec: dict[str, Any], data: str, valid: bool
) -> None:
    # The event's `data` is JSON of the chunk schema (contentSchema), or the closing [DONE].
    event = resolve(spec, "#/components/schemas/ChatCompletionChunkEvent")
    then = event["properties"]["data"]["then"]
    assert then["contentMediaType"] == "application/json"
    payload = {"$ref": "#/x", "x": then["contentSchema"], "components": spec["components"]}
    if data == "[DONE]":
        assert schema_verdict(spec, "ChatCompletionChunkEvent", {"data": data})
        return
    try:
        decoded = json.loads(data)
    except json.JSONDecodeError:
        decoded = None
    ok = decoded is not None and jsonschema.Draft202012Validator(payload).is_valid(decoded)
    assert ok == valid
    assert schema_verdict(spec, "ChatCompletionChunkEvent", {"data": data})  # a string either way


def test_docs_assets_are_shipped() -> None:
    page = DOCS_PAGE.read_text()
    assert "/static/swagger/swagger-ui-bundle.js" in page
    assert "/static/swagger/swagger-ui.css" in page
    assert '"/openapi.json"' in page
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "NOTICE"):
        assert (STATIC_DIR / "swagger" / name).stat().st_size > 0
