"""The OpenAPI document: valid 3.1, stable names, every reference resolves; docs assets ship."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from openapi_spec_validator import validate

from vlmserve.frontend.openapi import DOCS_PAGE, STATIC_DIR, openapi_spec

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


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    # Through JSON, as clients get it: the document must survive encoding.
    return msgspec.json.decode(msgspec.json.encode(openapi_spec("tiny-vlm")))


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


def test_spec_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"] == "3.1.0"
    validate(spec)


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
    assert "ChatCompletionChunk" in content["text/event-stream"]["schema"]["description"]
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


def test_request_constraints_reach_the_document(spec: dict[str, Any]) -> None:
    props = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    temperature = props["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0.0, 2.0)
    assert spec["components"]["schemas"]["ChatCompletionRequest"]["required"] == ["messages"]


def test_docs_assets_are_shipped() -> None:
    page = DOCS_PAGE.read_text()
    assert "/static/swagger/swagger-ui-bundle.js" in page
    assert "/static/swagger/swagger-ui.css" in page
    assert '"/openapi.json"' in page
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "NOTICE"):
        assert (STATIC_DIR / "swagger" / name).stat().st_size > 0
