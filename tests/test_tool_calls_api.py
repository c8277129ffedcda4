"""Tool calling through the real server and the `openai` client, on Qwen2.5-7B-Instruct's
published files shrunk to a tiny random checkpoint (its real chat template, with its tools
section and `<tool_call>` history, and its tokens at their real ids), served with
`--tool-call-parser hermes --reasoning-parser qwen3`.

How the answers are made:
- `required` and a named function: the server constrains the answer with a JSON-schema
  grammar, so even random weights write valid calls, many tokens long;
- `auto`: random weights never write a `<tool_call>` block on their own, so the test adds one
  token to the checkpoint's tokenizer that spells a whole Qwen answer (thinking, then a call)
  and forces it with `logit_bias`; a stop string at `</tool_call>` ends the answer there. The
  text the server parses is then exactly what Qwen2.5 writes.
"""

from __future__ import annotations

import json
import os

import httpx
import jsonschema
import openai
import pytest
import transformers
from server_fixtures import local_config

from vlmserve.deploy.launcher import server
from vlmserve.frontend.errors import APIError
from vlmserve.frontend.schemas import ChatCompletionRequest
from vlmserve.frontend.tool_choice import plan_tools, template_tools
from vlmserve.frontend.validation import decode_request
from vlmserve.workers.demo_real import build_from_config

CORPUS = os.path.join(os.path.dirname(__file__), "data", "realconfigs")
CITY = {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": CITY}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"city": CITY, "hour24": {"type": "boolean"}},
            "required": ["city", "hour24"],
        },
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# One token that spells what Qwen writes when it thinks, then calls a tool.
FORCED = (
    "<think>\nThe user wants the weather in Paris.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    """The checkpoint, and the id of the token spelling FORCED."""
    model_dir = str(tmp_path_factory.mktemp("qwen-tools") / "ckpt")
    build_from_config(os.path.join(CORPUS, "Qwen__Qwen2.5-7B-Instruct"), model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens([FORCED])  # id 151665: the model scores 152064 ids
    tokenizer.save_pretrained(model_dir)
    return model_dir, tokenizer.convert_tokens_to_ids(FORCED)


@pytest.fixture(scope="module")
def srv(qwen: tuple[str, int], tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("tools")
    config = local_config(
        qwen[0], workdir, tool_call_parser="hermes", reasoning_parser="qwen3", num_kv_blocks=256
    )
    with server(config, str(workdir / "server.log")) as running:
        yield running


@pytest.fixture(scope="module")
def client(srv: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)


def forced_auto(qwen: tuple[str, int]) -> dict:
    """What makes the model write FORCED under tool_choice auto (see the module's note)."""
    return dict(
        logit_bias={str(qwen[1]): 100},
        stop=["</tool_call>"],
        extra_body={"include_stop_str_in_output": True},
    )


def chat(client: openai.OpenAI, srv: dict, **fields: object):  # noqa: ANN201
    body = dict(model=srv["config"].served_name, messages=ASK, tools=TOOLS, temperature=0)
    return client.chat.completions.create(**(body | fields))


def call_of(message) -> tuple[str, dict]:  # noqa: ANN001
    (call,) = message.tool_calls
    assert call.type == "function" and call.id
    return call.function.name, json.loads(call.function.arguments)


def rendered_length(model_dir: str, messages: list[dict]) -> int:
    """Prompt tokens of `messages` with TOOLS, as transformers renders them (arguments of
    earlier calls as objects, as the template expects)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(
        messages, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    return len(tokenizer(text)["input_ids"])


def test_auto_round_trip(client: openai.OpenAI, srv: dict, qwen: tuple[str, int]) -> None:
    first = chat(client, srv, max_tokens=4, **forced_auto(qwen))
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == "\nThe user wants the weather in Paris.\n"
    assert call_of(choice.message) == ("get_weather", {"city": "Paris"})
    assert first.usage.prompt_tokens == rendered_length(qwen[0], ASK)  # the tools were shown

    call = choice.message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
    ]
    final = chat(client, srv, messages=history, max_tokens=6)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert isinstance(final.choices[0].message.content, str)
    template_history = [
        *ASK,
        {"role": "assistant", "tool_calls": [{"type": "function", "id": call.id, "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
    ]  # fmt: skip
    assert final.usage.prompt_tokens == rendered_length(qwen[0], template_history)
    # tool_choice none: the tools are still shown (vLLM's default); the thinking is split
    # off, the call is not read.
    none = chat(client, srv, tool_choice="none", max_tokens=4, **forced_auto(qwen))
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == FORCED[FORCED.index("</think>") + 8 :]
    assert none.usage.prompt_tokens == first.usage.prompt_tokens


NAMED = {"type": "function", "function": {"name": "get_time"}}


# A random model may repeat calls until max_tokens under `required`; `parallel_tool_calls:
# false` makes the grammar stop after one call.
GREEDY_ONE = {"temperature": 0, "parallel_tool_calls": False, "max_tokens": 80}
SAMPLED = {"temperature": 1.0, "seed": 7, "max_tokens": 80}


@pytest.mark.parametrize(
    ("tool_choice", "sampling"),
    [("required", GREEDY_ONE), (NAMED, SAMPLED)],
    ids=["required", "named"],
)
def test_forced_choices_are_valid_calls(
    client: openai.OpenAI, srv: dict, tool_choice: object, sampling: dict
) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    history = list(ASK)
    for turn in (sampling, GREEDY_ONE):  # the second turn carries the calls and their results
        out = chat(client, srv, messages=history, tool_choice=tool_choice, **turn)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and choice.message.tool_calls
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            if tool_choice is NAMED:
                assert call.function.name == "get_time"
        history += [
            choice.message.model_dump(exclude_none=True),
            *[
                {"role": "tool", "tool_call_id": c.id, "content": "ok"}
                for c in choice.message.tool_calls
            ],
        ]


def reassembled(stream) -> tuple[list[tuple[str, str]], str | None, str]:  # noqa: ANN001
    """(name, arguments) per call, the finish reason and the reasoning, from the chunks; each
    call's first piece must carry its id, type and name, and later ones none."""
    calls: dict[int, list] = {}
    finish, reasoning = None, ""
    for chunk in stream:
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or []:
                if piece.index not in calls:
                    assert piece.id and piece.type == "function" and piece.function.name
                    calls[piece.index] = [piece.function.name, ""]
                else:
                    assert piece.id is None and piece.function.name is None
                calls[piece.index][1] += piece.function.arguments or ""
    return [tuple(c) for _, c in sorted(calls.items())], finish, reasoning


@pytest.mark.parametrize("kind", ["auto", "required", "named"])
def test_streamed_calls_reassemble_to_the_non_streamed(
    client: openai.OpenAI, srv: dict, qwen: tuple[str, int], kind: str
) -> None:
    fields = {
        "auto": {**forced_auto(qwen), "max_tokens": 4},
        "required": {"tool_choice": "required", **GREEDY_ONE},
        "named": {"tool_choice": NAMED, **GREEDY_ONE},
    }[kind]
    whole = chat(client, srv, **fields).choices[0]
    calls, finish, reasoning = reassembled(chat(client, srv, stream=True, **fields))
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert calls == expected and finish == whole.finish_reason == "tool_calls"
    assert reasoning == (getattr(whole.message, "reasoning_content", None) or "")


def post(srv: dict, body: dict) -> httpx.Response:
    body = {"model": srv["config"].served_name, "messages": ASK, "max_tokens": 2} | body
    return httpx.post(srv["url"] + "/v1/chat/completions", json=body, timeout=60)


UNKNOWN = {"type": "function", "function": {"name": "nope"}}
BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}
BAD_CALL = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": TOOLS, "tool_choice": UNKNOWN}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [BAD_TOOL], "tool_choice": "required"}, "tools"),
        ({"messages": [*ASK, {"role": "assistant", "tool_calls": [BAD_CALL]}]}, "messages"),
    ],
    ids=["unknown-name", "required-without-tools", "bad-parameters", "bad-history-arguments"],
)
def test_refusals_name_the_field(srv: dict, body: dict, param: str) -> None:
    resp = post(srv, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert post(srv, {"tools": TOOLS, "tool_choice": "none"}).status_code == 200


def test_auto_needs_a_tool_call_parser() -> None:
    body = {"messages": ASK, "tools": TOOLS}
    req = decode_request(json.dumps(body).encode(), ChatCompletionRequest)
    with pytest.raises(APIError) as err:
        plan_tools(req, tool_parser="", reasoning_parser="")
    assert err.value.param == "tool_choice" and "--tool-call-parser" in err.value.message
    plan = plan_tools(req, tool_parser="hermes", reasoning_parser="")
    assert plan.grammar is None and plan.tools == template_tools(req.tools)
