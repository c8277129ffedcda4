"""Structured output through the real server: the request fields (response_format, vLLM's
structured_outputs and guided_*, LMDeploy's regex_schema) become one Grammar; a random-weight
model's answers under it always follow the schema, regex or choice; the openai client's
`parse`; bad specs are 400s naming the field while other requests go on."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import shutil

import httpx
import jsonschema
import msgspec
import openai
import pydantic
import pytest
import transformers
from falcon import testing
from server_fixtures import local_config

from vlmserve.deploy.launcher import server
from vlmserve.frontend.app import create_app
from vlmserve.frontend.errors import APIError
from vlmserve.frontend.schemas import ChatCompletionRequest, CompletionRequest
from vlmserve.frontend.structured_output import grammar_for
from vlmserve.frontend.validation import decode_request
from vlmserve.shared.config import Config, new_run_id
from vlmserve.shared.messages import Grammar

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "items": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "tags": {
                        "type": "array",
                        "maxItems": 2,
                        "items": {"type": "string", "maxLength": 5},
                    },
                },
                "required": ["id", "tags"],
            },
        },
    },
    "required": ["name", "items"],
}
ENUMS_AND_NUMBERS = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "number", "minimum": -1.5, "maximum": 10},
        "count": {"type": "integer", "minimum": 1, "maximum": 5},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "size", "count", "ok"],
}
EMAIL = r"[a-z]{1,8}@[a-z]{2,6}\.(com|org)"
COLORS = ["red", "green", "blue", "日本"]
MESSAGES = [{"role": "user", "content": "describe the picture"}]


def schema_format(schema: dict | None, name: str | None = "x") -> dict:
    """`response_format` asking for JSON that follows `schema`."""
    spec = {"name": name} | ({"schema": schema} if schema is not None else {})
    return {"response_format": {"type": "json_schema", "json_schema": spec}}


def choice_of(choices: list[str]) -> Grammar:
    return Grammar("choice", json.dumps(choices, ensure_ascii=False))


# ---- the request fields ------------------------------------------------------------------------


def grammar_of(body: dict, kind: type = ChatCompletionRequest) -> Grammar | None:
    base = {"messages": MESSAGES} if kind is ChatCompletionRequest else {"prompt": "hi"}
    return grammar_for(decode_request(json.dumps(base | body).encode(), kind))


def test_every_field_becomes_one_grammar() -> None:
    schema_text = msgspec.json.encode(NESTED).decode()
    nested = Grammar("json_schema", schema_text)
    regex, ebnf = Grammar("regex", EMAIL), Grammar("ebnf", 'root ::= "a" | "b"')
    cases = [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, Grammar("json_object")),
        (schema_format(NESTED), nested),
        (schema_format(None), Grammar("json_object")),
        ({"response_format": {"type": "regex_schema", "regex_schema": EMAIL}}, regex),
        ({"structured_outputs": {"json": NESTED}}, nested),
        ({"structured_outputs": {"json": json.dumps(NESTED, indent=2)}}, nested),
        ({"structured_outputs": {"regex": EMAIL}}, regex),
        ({"structured_outputs": {"choice": COLORS}}, choice_of(COLORS)),
        ({"structured_outputs": {"grammar": ebnf.spec}}, ebnf),
        ({"structured_outputs": {"json_object": True}}, Grammar("json_object")),
        ({"guided_json": NESTED}, nested),
        ({"guided_regex": EMAIL}, regex),
        ({"guided_choice": COLORS}, choice_of(COLORS)),
        ({"guided_grammar": 'root ::= "a"'}, Grammar("ebnf", 'root ::= "a"')),
    ]  # fmt: skip
    for body, expected in cases:
        assert grammar_of(body) == expected, body
    assert grammar_of({"guided_regex": EMAIL}, CompletionRequest) == Grammar("regex", EMAIL)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        (schema_format({"type": "foo"}, name=None), "response_format"),
        ({"response_format": {"type": "regex_schema", "regex_schema": "(ab"}}, "response_format"),
        ({"guided_json": {"properties": {"a": {"$ref": "#/nowhere"}}}}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"guided_grammar": 'root ::= "a" | b'}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"json": {"type": "nope"}}}, "structured_outputs"),
    ],
)  # fmt: skip
def test_bad_or_several_constraints_are_400s_naming_the_field(body: dict, param: str) -> None:
    with pytest.raises(APIError) as err:
        grammar_of(body)
    assert (err.value.status, err.value.param) == (400, param), err.value.message
    assert "/project/" not in err.value.message


def test_response_format_needs_a_chat_template(checkpoints: dict, tmp_path_factory) -> None:  # noqa: ANN001
    """In process (nothing reaches an engine): the refusal names `response_format`."""
    model = str(tmp_path_factory.mktemp("no-template") / "model")
    shutil.copytree(checkpoints["llama"], model)
    os.remove(os.path.join(model, "chat_template.jinja"))
    config = Config(model=model, run_id=new_run_id(), ipc_dir=str(tmp_path_factory.mktemp("run")))
    client = testing.TestClient(create_app(config))
    body = {"messages": MESSAGES, "response_format": {"type": "json_object"}}
    answer = client.simulate_post("/v1/chat/completions", json=body)
    assert answer.status_code == 400 and answer.json["error"]["param"] == "response_format"
    body["response_format"] = {"type": "text"}  # no constraint: the usual refusal
    answer = client.simulate_post("/v1/chat/completions", json=body)
    assert answer.status_code == 400 and answer.json["error"]["param"] == "messages"


# ---- the live server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("structured")
    config = local_config(checkpoints["llama"], workdir, session_len=512, num_kv_blocks=512)
    with server(config, str(workdir / "server.log")) as running:
        yield running


@pytest.fixture(scope="module")
def client(srv: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)


def post(srv: dict, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv["url"] + path, json=body, timeout=120)


def prompts(count: int) -> list[str]:
    rng = random.Random(count)
    words = "the a cat dog red blue model token server stream picture image photo".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(count)]


def answers(srv: dict, constraint: dict) -> list[tuple[str, str]]:
    """50 answers under `constraint`: 25 greedy (a batch of completions) and 25 sampled (two
    seeded chats, n=12 and n=13); each (text, finish reason)."""
    greedy = {"prompt": prompts(25), "temperature": 0, "max_tokens": 200}
    sampled = {"messages": MESSAGES, "temperature": 1.0, "max_tokens": 200}
    out = []
    replies = [
        post(srv, "/v1/completions", greedy | constraint),
        post(srv, "/v1/chat/completions", sampled | constraint | {"n": 12, "seed": 3}),
        post(srv, "/v1/chat/completions", sampled | constraint | {"n": 13, "seed": 4}),
    ]
    for reply in replies:
        assert reply.status_code == 200, reply.text
        for choice in reply.json()["choices"]:
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            out.append((text, choice["finish_reason"]))
    return out


def valid_json(schema: dict):  # noqa: ANN201
    return lambda text: jsonschema.validate(json.loads(text), schema) is None


CONSTRAINTS = {
    "nested arrays": (schema_format(NESTED), valid_json(NESTED)),
    "enums, bounded numbers": ({"guided_json": ENUMS_AND_NUMBERS}, valid_json(ENUMS_AND_NUMBERS)),
    "regex": ({"structured_outputs": {"regex": EMAIL}}, lambda text: re.fullmatch(EMAIL, text)),
    "choice": ({"guided_choice": COLORS}, lambda text: text in COLORS),
}  # fmt: skip


def test_fifty_greedy_and_sampled_answers_per_constraint_all_follow_it(srv: dict) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(CONSTRAINTS)) as pool:
        results = dict(
            zip(
                CONSTRAINTS,
                pool.map(lambda c: answers(srv, c[0]), CONSTRAINTS.values()),
                strict=True,
            )
        )
    for name, outs in results.items():
        follows = CONSTRAINTS[name][1]
        stopped = [text for text, reason in outs if reason == "stop"]
        # The schemas bound every string and array: an answer that does not stop is a bug.
        assert len(outs) == 50 and len(stopped) == 50, (name, [o for o in outs if o[1] != "stop"])
        for text in stopped:
            assert follows(text), (name, text)
        assert len(set(stopped)) >= 3, (name, "the answers differ")


def test_json_object_answers_always_parse(srv: dict, checkpoints: dict) -> None:
    # A random model seldom closes a string or an object of its own accord: a bias toward `"`
    # and `}` lets most answers end within max_tokens (what the grammar allows is unchanged).
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoints["llama"])
    closing = {str(tokenizer.convert_tokens_to_ids(t)): 8.0 for t in ('"', "}")}
    body = {
        "messages": MESSAGES, "n": 16, "seed": 5, "temperature": 1.0, "max_tokens": 120,
        "response_format": {"type": "json_object"}, "logit_bias": closing,
    }  # fmt: skip
    reply = post(srv, "/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    stopped = [c["message"]["content"] for c in choices if c["finish_reason"] == "stop"]
    assert len(stopped) >= 12, "most objects close within max_tokens"
    assert all(isinstance(json.loads(text), dict) for text in stopped)
    again = post(srv, "/v1/chat/completions", body).json()["choices"]
    assert [c["message"] for c in again] == [c["message"] for c in choices], "seeded: the same"


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    kind: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog"]})
    age: int = pydantic.Field(ge=0, le=30)


def test_the_openai_clients_parse_returns_the_object(client: openai.OpenAI, srv: dict) -> None:
    completion = client.chat.completions.parse(
        model=srv["config"].served_name, messages=MESSAGES, response_format=Pet, max_tokens=100,
        temperature=0,
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet) and choice.message.parsed.kind in ("cat", "dog")


def test_a_streamed_constrained_answer_joins_to_the_same_json(srv: dict) -> None:
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 200, "guided_json": NESTED}
    whole = post(srv, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    parts = []
    with httpx.stream(
        "POST", srv["url"] + "/v1/chat/completions", json=body | {"stream": True}, timeout=60
    ) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    parts.append(choice["delta"].get("content") or "")
    assert "".join(parts) == whole and valid_json(NESTED)(whole)


def test_bad_specs_are_400s_while_another_request_goes_on(srv: dict) -> None:
    long = {"prompt": "the cat", "max_tokens": 150, "ignore_eos": True, "temperature": 0}
    bad = [
        (schema_format({"type": "foo"}), "response_format"),
        ({"guided_regex": "(ab"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs"),
    ]  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, srv, "/v1/completions", long)
        for constraint, param in bad:
            reply = post(srv, "/v1/chat/completions", {"messages": MESSAGES} | constraint)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
        done = running.result()
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 150
