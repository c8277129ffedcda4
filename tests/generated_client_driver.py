"""Drives a vlmserve server with the Python client openapi-generator made from its
/openapi.json (package `vlmclient`), and prints what it got as one JSON object.

Run by tests/test_generated_clients.py with the Python of a fresh virtual environment that
has only the generated client and its own dependencies installed, so nothing here may import
vlmserve. Answers are read through the generated models' attributes (a dict would fail), and
each answer's class is reported so the test can check the client returned typed models.

    python generated_client_driver.py URL API_KEY MODEL
"""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

import vlmclient
from vlmclient import exceptions
from vlmclient.models import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    DetokenizeRequest,
    TextPart,
    TokenizeRequest,
    UserChatMessage,
)

HELLO = "hello there, how are you?"


def kind(answer: object) -> str:
    return f"{type(answer).__module__}.{type(answer).__qualname__}"


def chat_request(model: str, content: object, **fields: object) -> ChatCompletionRequest:
    """A request built from plain JSON-like values with the generated `from_dict`, which
    turns the nested objects (the message) into the generated models."""
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return ChatCompletionRequest.from_dict(body | {"max_tokens": 12, "temperature": 0} | fields)


def parts_request(model: str) -> ChatCompletionRequest:
    """A user message whose content is a list of parts, built from the generated classes:
    `from_dict` leaves a union inside a list inside a union empty (openapi-generator's Python
    models build it from keyword arguments), which the server refuses. The content union is
    inline, so its generated name is read from the message's field instead of written here."""
    content = UserChatMessage.model_fields["content"].annotation
    part = ContentPart(TextPart(type="text", text=HELLO))
    message = ChatMessage(UserChatMessage(role="user", content=content([part])))
    return ChatCompletionRequest(model=model, messages=[message], max_tokens=12, temperature=0)


def chat(api: vlmclient.ChatApi, request: ChatCompletionRequest) -> dict[str, Any]:
    answer = api.create_chat_completion(request)
    choice = answer.choices[0]
    return {
        "type": kind(answer),
        "choice_type": kind(choice),
        "message_type": kind(choice.message),
        "content": choice.message.content,
        "finish_reason": choice.finish_reason,
        "completion_tokens": answer.usage.completion_tokens,
        "model": answer.model,
    }


def chat_stream(api: vlmclient.ChatApi, model: str) -> dict[str, Any]:
    """The generated client has no SSE reader: take the raw response and parse each `data:`
    event with the generated ChatCompletionChunk model."""
    request = chat_request(model, HELLO, stream=True, stream_options={"include_usage": True})
    response = api.create_chat_completion_without_preload_content(request)
    chunks, done = [], False
    for line in response.data.decode().splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            chunks.append(ChatCompletionChunk.from_json(line.removeprefix("data: ")))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    return {
        "status": response.status,
        "types": sorted({kind(c) for c in chunks}),
        "text": "".join(pieces),
        "done": done,
        "completion_tokens": chunks[-1].usage.completion_tokens,
    }


def completion(api: vlmclient.CompletionsApi, model: str) -> dict[str, Any]:
    request = CompletionRequest.from_dict(
        {"model": model, "prompt": "the cat and the dog", "max_tokens": 8, "temperature": 0}
    )
    answer = api.create_completion(request)
    return {
        "type": kind(answer),
        "text": answer.choices[0].text,
        "prompt_tokens": answer.usage.prompt_tokens,
    }


def tokenizer(api: vlmclient.TokenizerApi, model: str) -> dict[str, Any]:
    tokens = api.tokenize(TokenizeRequest(model=model, prompt=HELLO))
    text = api.detokenize(DetokenizeRequest(model=model, tokens=tokens.tokens))
    return {"type": kind(tokens), "tokens": tokens.tokens, "count": tokens.count,
            "detokenized_type": kind(text), "detokenized": text.prompt}  # fmt: skip


def refusal(call: Any) -> dict[str, Any]:  # noqa: ANN401 - any generated API method
    """What the generated client raises for an error answer, with its typed body."""
    try:
        call()
    except exceptions.ApiException as err:
        detail = err.data.error
        return {"exception": type(err).__name__, "status": err.status, "data_type": kind(err.data),
                "param": detail.param, "code": detail.code, "message": detail.message}  # fmt: skip
    return {"exception": None}


def main(url: str, api_key: str, model: str) -> dict[str, Any]:
    report: dict[str, Any] = {
        "vlmserve_importable": importlib.util.find_spec("vlmserve") is not None
    }
    config = vlmclient.Configuration(host=url, access_token=api_key)
    with vlmclient.ApiClient(config) as client:
        models = vlmclient.ModelsApi(client).list_models()
        report["models"] = {"type": kind(models), "ids": [card.id for card in models.data]}
        chat_api = vlmclient.ChatApi(client)
        report["chat"] = chat(chat_api, chat_request(model, HELLO))
        report["chat_parts"] = chat(chat_api, parts_request(model))
        report["chat_stream"] = chat_stream(chat_api, model)
        report["completion"] = completion(vlmclient.CompletionsApi(client), model)
        report["tokenizer"] = tokenizer(vlmclient.TokenizerApi(client), model)
        report["health"] = vlmclient.ServerApi(client).health_with_http_info().status_code
        # Valid for the schema (the client checks that itself), refused by the server.
        bad = chat_request(model, HELLO, top_logprobs=2)
        report["bad_request"] = refusal(lambda: chat_api.create_chat_completion(bad))
        unknown = CompletionRequest.from_dict({"model": "no-such-model", "prompt": "hi"})
        report["unknown_model"] = refusal(
            lambda: vlmclient.CompletionsApi(client).create_completion(unknown)
        )
    wrong = vlmclient.Configuration(host=url, access_token="wrong")
    with vlmclient.ApiClient(wrong) as client:
        report["wrong_key"] = refusal(vlmclient.ModelsApi(client).list_models)
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
