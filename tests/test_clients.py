"""The clients that ship with the server, against the real server: `APIClient`,
`AsyncAPIClient`, the terminal chat (`vlmserve serve api_client`, driven through a
pseudo-terminal), and `/openapi.json` as input for client generators.

One server (scheduler, worker, one Gunicorn frontend, API keys on) on the tiny Llama
checkpoint serves the module. Answers are greedy (temperature 0), so two ways of asking
the same thing must give the same text.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import httpx
import pexpect
import pytest
from openapi_spec_validator import validate
from PIL import Image
from server_fixtures import free_port, local_config, metrics, wait_for
from test_openapi import OPERATION_IDS

from vlmserve.client import (
    APIClient,
    AsyncAPIClient,
    ServerError,
    ServerUnreachable,
)
from vlmserve.deploy.launcher import server
from vlmserve.frontend.chat_cli import printable

API_KEY = "sk-clients"
SESSION_LEN = 2048
HELLO = "hello there, how are you?"


@pytest.fixture(scope="module")
def srv(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("clients")
    config = local_config(
        checkpoints["llama"],
        workdir,
        frontend_workers=1,
        api_keys=API_KEY,
        session_len=SESSION_LEN,
        num_kv_blocks=1024,
    )
    with server(config, str(workdir / "server.log")) as running:
        running["log"] = str(workdir / "server.log")
        yield running


@pytest.fixture(scope="module")
def client(srv: dict):
    with APIClient(srv["url"], api_key=API_KEY) as c:
        yield c


def model_name(srv: dict) -> str:
    return srv["config"].served_name


def greedy_chat(client: APIClient, model: str, messages: list[dict], max_tokens: int) -> str:
    [reply] = client.chat_completions_v1(model, messages, max_tokens=max_tokens, temperature=0)
    return reply["choices"][0]["message"]["content"]


def chat_prompt_tokens(srv: dict, messages: list[dict]) -> int:
    """How many tokens the server makes of `messages` (its /tokenize, with the template)."""
    resp = httpx.post(
        srv["url"] + "/tokenize",
        json={"messages": messages},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    resp.raise_for_status()
    return resp.json()["count"]


# ---- APIClient ---------------------------------------------------------------------------


def test_available_models(client: APIClient, srv: dict) -> None:
    assert client.available_models == [model_name(srv)]


def test_chat_stream_joins_to_the_non_streamed_answer(client: APIClient, srv: dict) -> None:
    kwargs = dict(max_tokens=20, temperature=0)
    [whole] = client.chat_completions_v1(model_name(srv), HELLO, **kwargs)
    assert whole["object"] == "chat.completion" and whole["usage"]["completion_tokens"] >= 1
    text = whole["choices"][0]["message"]["content"]
    chunks = list(
        client.chat_completions_v1(
            model_name(srv), [{"role": "user", "content": HELLO}], stream=True,
            stream_options={"include_usage": True}, **kwargs,
        )
    )  # fmt: skip
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(chunks) > 3, "the answer arrives in several chunks"
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    assert streamed == text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == whole["choices"][0]["finish_reason"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [chunks[-1]["usage"][k] for k in counts] == [whole["usage"][k] for k in counts]


def test_completions_stream_and_not(client: APIClient, srv: dict) -> None:
    prompt = "the cat and the dog"
    [whole] = client.completions_v1(model_name(srv), prompt, max_tokens=12, temperature=0)
    assert whole["object"] == "text_completion"
    ids, length = client.encode(prompt)
    assert whole["usage"]["prompt_tokens"] == length
    chunks = list(
        client.completions_v1(model_name(srv), prompt, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    [by_ids] = client.completions_v1(model_name(srv), ids, max_tokens=12, temperature=0)
    assert by_ids["choices"][0]["text"] == whole["choices"][0]["text"]


def test_encode_equals_the_encode_route(client: APIClient, srv: dict) -> None:
    def route(**body: object) -> dict:
        resp = httpx.post(
            srv["url"] + "/v1/encode", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        return resp.json()

    for kwargs in ({}, {"add_bos": False}, {"do_preprocess": True}):
        for text in ("hello there", ["one two", "three"]):
            ids, length = client.encode(text, **kwargs)
            expected = route(input=text, **kwargs)
            assert (ids, length) == (expected["input_ids"], expected["length"]), kwargs
    ids, length = client.encode("hello there")
    assert length == len(ids) and ids != client.encode("hello there", add_bos=False)[0]


def test_server_errors_are_raised_with_the_servers_message(client: APIClient, srv: dict) -> None:
    for stream in (False, True):
        with pytest.raises(ServerError) as err:
            list(client.chat_completions_v1(model_name(srv), HELLO, temperature=-1, stream=stream))
        assert err.value.status == 400 and err.value.param == "temperature"
        assert "temperature" in err.value.message and "temperature" in str(err.value)
    with pytest.raises(ServerError) as err:
        list(client.completions_v1("no-such-model", "hi"))
    assert err.value.status == 404 and err.value.code == "model_not_found"
    assert "no-such-model" in err.value.message
    with APIClient(srv["url"], api_key="wrong") as wrong:
        with pytest.raises(ServerError) as err:
            wrong.available_models  # noqa: B018 - the property makes the request
    assert err.value.status == 401 and "API key" in err.value.message
    with APIClient(f"http://127.0.0.1:{free_port()}") as nowhere:
        with pytest.raises(ServerUnreachable, match="cannot reach"):
            nowhere.encode("hi")


def test_leaving_a_stream_early_aborts_the_request(client: APIClient, srv: dict) -> None:
    stream = client.chat_completions_v1(
        model_name(srv), HELLO, max_tokens=1000, temperature=0, stream=True, ignore_eos=True
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    wait_for(lambda: metrics(srv["url"])["vlmserve:num_requests_running"] >= 1, 5, "it to run")
    stream.close()
    wait_for(
        lambda: metrics(srv["url"])["vlmserve:num_requests_running"] == 0,
        10,
        "the server to abort the request",
    )


# ---- server-sent events: what a live server only sends when it fails ----------------------


def sse_client(body: bytes, status: int = 200) -> APIClient:
    """An APIClient whose server answers every request with `body` as an event stream."""
    client = APIClient("http://test")
    transport = httpx.MockTransport(
        lambda request: httpx.Response(
            status, content=body, headers={"Content-Type": "text/event-stream"}
        )
    )
    client.http = httpx.Client(transport=transport, headers=client.headers)
    return client


def test_an_error_event_mid_stream_raises_after_the_chunks_before_it() -> None:
    error = {"error": {"message": "worker rank 0 failed", "type": "server_error", "code": None}}
    body = (
        b': keep-alive\n\ndata: {"n": 1}\n\n'
        b'data: {"n":\ndata: 2}\n\n'  # one event in two data lines
        + f"data: {json.dumps(error)}\n\n".encode()
    )
    got = []
    with pytest.raises(ServerError) as err:
        for chunk in sse_client(body).chat_completions_v1("m", "hi", stream=True):
            got.append(chunk)
    assert got == [{"n": 1}, {"n": 2}]
    assert err.value.status is None and err.value.message == "worker rank 0 failed"
    assert "during the stream" in str(err.value)


def test_done_ends_the_stream_and_its_absence_is_an_error() -> None:
    done = b'data: {"n": 1}\r\n\r\ndata: [DONE]\r\n\r\ndata: {"n": 2}\n\n'
    assert list(sse_client(done).completions_v1("m", "hi", stream=True)) == [{"n": 1}]
    cut = b'data: {"n": 1}\n\n'
    with pytest.raises(ServerError, match=r"ended before \[DONE\]"):
        list(sse_client(cut).completions_v1("m", "hi", stream=True))
    with pytest.raises(ServerError) as err:
        list(sse_client(b"upstream exploded", status=502).completions_v1("m", "hi", stream=True))
    assert err.value.status == 502 and err.value.message == "upstream exploded"


# ---- AsyncAPIClient ----------------------------------------------------------------------


def test_async_client_gives_what_the_sync_client_gives(client: APIClient, srv: dict) -> None:
    model = model_name(srv)
    expected_chat = greedy_chat(client, model, [{"role": "user", "content": HELLO}], 16)
    [expected_completion] = client.completions_v1(model, "red blue", max_tokens=8, temperature=0)

    async def run() -> None:
        async with AsyncAPIClient(srv["url"], api_key=API_KEY) as aclient:
            assert await aclient.available_models == [model]
            assert await aclient.encode("hello there") == client.encode("hello there")
            replies = [r async for r in aclient.chat_completions_v1(model, HELLO, max_tokens=16,
                                                                    temperature=0)]  # fmt: skip
            assert [r["choices"][0]["message"]["content"] for r in replies] == [expected_chat]
            chunks = [
                c
                async for c in aclient.chat_completions_v1(
                    model, HELLO, max_tokens=16, temperature=0, stream=True
                )
            ]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert text == expected_chat
            pieces = [
                c["choices"][0]["text"]
                async for c in aclient.completions_v1(
                    model, "red blue", max_tokens=8, temperature=0, stream=True
                )
            ]
            assert "".join(pieces) == expected_completion["choices"][0]["text"]
            with pytest.raises(ServerError) as err:
                async for _ in aclient.chat_completions_v1(model, HELLO, top_p=3, stream=True):
                    pass
            assert err.value.status == 400 and err.value.param == "top_p"
        async with AsyncAPIClient(f"http://127.0.0.1:{free_port()}") as nowhere:
            with pytest.raises(ServerUnreachable):
                await nowhere.available_models

    asyncio.run(run())


# ---- the terminal chat -------------------------------------------------------------------

SUMMARY = re.compile(r"\[prompt (\d+) tokens, answer (\d+) tokens, finish: ([a-z ]+)\]")


def chat_command() -> tuple[str, list[str]]:
    script = Path(sys.executable).with_name("vlmserve")
    if script.exists():
        return str(script), ["serve", "api_client"]
    return sys.executable, ["-m", "vlmserve", "serve", "api_client"]


def spawn_chat(url: str, *args: str) -> pexpect.spawn:
    program, argv = chat_command()
    env = {**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8"}
    return pexpect.spawn(
        program, [*argv, url, *args], env=env, encoding="utf-8", timeout=60,
        dimensions=(40, 2000),  # no line wrapping in what we read back
    )  # fmt: skip


def ask(chat: pexpect.spawn, text: str) -> tuple[str, int, str]:
    """Send `text`; the streamed answer as printed, the prompt tokens the server counted,
    and the finish reason."""
    chat.expect_exact("you> ")
    chat.sendline(text)
    chat.expect_exact("assistant> ")
    chat.expect(SUMMARY)
    printed = chat.before.replace("\r\n", "\n").removesuffix("\n")
    return printed, int(chat.match.group(1)), chat.match.group(3)


def test_terminal_chat_streams_keeps_history_resets_and_exits(
    client: APIClient, srv: dict, tmp_path: Path
) -> None:
    model, url = model_name(srv), srv["url"]
    chat = spawn_chat(url, "--api-key", API_KEY, "--temperature", "0", "--max-tokens", "12")
    try:
        chat.expect_exact(f"model {model}")
        u1, u2, u3 = "hello there, how are you?", "and tomorrow?", "a new start"
        turn1 = [{"role": "user", "content": u1}]
        a1 = greedy_chat(client, model, turn1, 12)
        printed, prompt, finish = ask(chat, u1)
        assert printed == printable(a1)
        assert prompt == chat_prompt_tokens(srv, turn1) and finish in ("length", "stop")

        # Turn 2 is answered from the whole conversation: the server counted turn 1 in it,
        # and the answer is the greedy answer to all three messages.
        turn2 = [*turn1, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
        printed, prompt, _ = ask(chat, u2)
        assert prompt == chat_prompt_tokens(srv, turn2)
        assert printed == printable(greedy_chat(client, model, turn2, 12))

        chat.expect_exact("you> ")
        chat.sendline("/reset")
        chat.expect_exact("(conversation cleared)")
        fresh = [{"role": "user", "content": u3}]
        printed, prompt, _ = ask(chat, u3)
        assert prompt == chat_prompt_tokens(srv, fresh)
        a3 = greedy_chat(client, model, fresh, 12)
        assert printed == printable(a3)

        # An image goes to the server, which refuses it (a text model): one line, no
        # traceback, and the refused turn is not kept.
        image = tmp_path / "red.png"
        Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
        chat.expect_exact("you> ")
        chat.sendline(f"/image {image}")
        chat.expect_exact("(image attached to your next message")
        chat.expect_exact("you> ")
        chat.sendline("what is this?")
        chat.expect_exact("error: HTTP 400: this model does not accept images")
        after = [*fresh, {"role": "assistant", "content": a3}, {"role": "user", "content": u1}]
        _, prompt, _ = ask(chat, u1)
        assert prompt == chat_prompt_tokens(srv, after)

        chat.expect_exact("you> ")
        chat.sendline("/image /no/such/file.png")
        chat.expect_exact("error: no such file: /no/such/file.png")
        chat.expect_exact("you> ")
        chat.sendline("/exit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0
    assert "Traceback" not in (chat.before or "")


def test_terminal_chat_ctrl_c_stops_an_answer_and_ctrl_d_quits(srv: dict) -> None:
    # An answer that cannot end before Ctrl-C reaches it, however fast the machine: 1500
    # tokens past any end-of-text (a greedy answer once reached eos first and hung the test).
    chat = spawn_chat(srv["url"], "--api-key", API_KEY, "--max-tokens", "1500",
                      "--temperature", "0", "--ignore-eos")  # fmt: skip
    try:
        chat.expect_exact("you> ")
        chat.sendline("Tell me a long story")
        chat.expect_exact("assistant> ")
        wait_for(
            lambda: metrics(srv["url"])["vlmserve:num_requests_running"] >= 1,
            10,
            "the answer to be generating",
        )
        chat.sendintr()
        chat.expect_exact("finish: stopped by you]")
        wait_for(
            lambda: metrics(srv["url"])["vlmserve:num_requests_running"] == 0,
            10,
            "the server to abort the stopped answer",
        )
        chat.expect_exact("you> ")
        chat.sendeof()
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0


@pytest.mark.parametrize("case", ["unreachable", "wrong key"])
def test_terminal_chat_fails_in_one_line_with_a_nonzero_status(srv: dict, case: str) -> None:
    if case == "unreachable":
        chat = spawn_chat(f"http://127.0.0.1:{free_port()}")
        expected = "error: cannot reach http://127.0.0.1:"
    else:
        chat = spawn_chat(srv["url"], "--api-key", "wrong")
        expected = "error: HTTP 401: Incorrect API key provided"
    chat.expect(pexpect.EOF)
    chat.close()
    output = chat.before.strip()
    assert output.startswith(expected) and len(output.splitlines()) == 1, output
    assert chat.exitstatus == 1


# ---- /openapi.json for client generators ----------------------------------------------------

SCHEMA_NAMES = {
    "ChatCompletionRequest", "ChatMessage", "TextPart", "ImagePart", "ImageURL", "StreamOptions",
    "ChatCompletion", "ChatChoice", "AssistantMessage", "ChatLogprobs", "ChatTokenLogprob",
    "TopLogprob", "Usage", "PromptTokensDetails", "ChatCompletionChunk", "ChatChunkChoice",
    "ChatDelta", "CompletionRequest", "Completion", "CompletionChoice", "CompletionLogprobs",
    "ModelList", "ModelCard", "EncodeRequest", "EncodeResponse", "TokenizeRequest",
    "TokenizeResponse", "DetokenizeRequest", "DetokenizeResponse", "ErrorResponse",
    "ErrorDetail",
}  # fmt: skip


def references(node: object):  # noqa: ANN201
    """Every `$ref`, and every schema a discriminator's mapping points to."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            elif key == "mapping" and isinstance(value, dict):
                yield from (v for v in value.values() if isinstance(v, str))
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def test_live_openapi_document_is_fit_for_client_generators(srv: dict) -> None:
    resp = httpx.get(srv["url"] + "/openapi.json")  # public: no key
    assert resp.status_code == 200
    spec = resp.json()
    validate(spec)

    operations = {
        (method.upper(), path): op
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in ("get", "put", "post", "delete", "patch", "options", "head")
    }
    ids = [op.get("operationId") for op in operations.values()]
    assert None not in ids, "every operation needs an operationId (the method name)"
    assert len(set(ids)) == len(ids), f"operationIds repeat: {ids}"
    assert all(re.fullmatch(r"[a-z][A-Za-z0-9]*", i) for i in ids), ids
    assert {k: operations[k]["operationId"] for k in OPERATION_IDS} == OPERATION_IDS

    schemas = spec["components"]["schemas"]
    assert SCHEMA_NAMES <= set(schemas), f"missing: {SCHEMA_NAMES - set(schemas)}"
    assert all(re.fullmatch(r"[A-Z][A-Za-z0-9]*", name) for name in schemas), sorted(schemas)
    lowered = [name.lower() for name in schemas]
    assert len(set(lowered)) == len(lowered), "names differing only in case clash in files"

    for ref in set(references(spec)):
        assert ref.startswith("#/"), f"external reference {ref}"
        node = spec
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]

    # Bodies and answers are named schemas, so generated methods take and return models.
    for key, op in operations.items():
        if "requestBody" in op:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            assert set(schema) == {"$ref"}, f"{key}: inline request schema"
        ok = op["responses"]["200"]
        if "application/json" in ok.get("content", {}):
            schema = ok["content"]["application/json"]["schema"]
            assert set(schema) == {"$ref"}, f"{key}: inline response schema"
