"""The OpenAI-compatible server end to end: real processes, the real `openai` client.

One server (scheduler, worker, two Gunicorn frontends) on the tiny Llama checkpoint serves
the whole module. Greedy answers are compared with transformers `generate` on the same
checkpoint and the same tokenization; every error case is followed by a request that must
succeed (the server stays healthy).
"""

from __future__ import annotations

import json
import os

import httpx
import openai
import pytest
import torch
import transformers
from openapi_spec_validator import validate
from server_fixtures import ChatReference, local_config, metrics, wait_for

from vlmserve.deploy.launcher import server
from vlmserve.frontend.sampling_params import bad_words_token_ids

API_KEY = "sk-test-key"
SESSION_LEN = 512
HELLO = [{"role": "user", "content": "hello there, how are you?"}]


@pytest.fixture(scope="module")
def srv(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("api")
    config = local_config(
        checkpoints["llama"],
        workdir,
        frontend_workers=2,
        api_keys=API_KEY,
        max_body_mb=1,
        session_len=SESSION_LEN,
        num_kv_blocks=1024,
    )
    with server(config, str(workdir / "server.log")) as running:
        running["log"] = str(workdir / "server.log")
        yield running


@pytest.fixture(scope="module")
def client(srv: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv["url"] + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def ref(checkpoints: dict) -> ChatReference:
    return ChatReference(checkpoints["llama"])


def model_name(srv: dict) -> str:
    return srv["config"].served_name


def post(srv: dict, path: str, body: object, key: str = API_KEY) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(srv["url"] + path, content=data, headers=headers, timeout=60)


def assert_healthy(client: openai.OpenAI, srv: dict) -> None:
    """After an error: the server still answers a normal request."""
    out = client.chat.completions.create(
        model=model_name(srv), messages=HELLO, max_tokens=3, temperature=0
    )
    assert out.usage.completion_tokens >= 1


def test_models_list(client: openai.OpenAI, srv: dict) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name(srv)]
    assert models.data[0].object == "model"


def test_chat_greedy_matches_transformers_with_exact_usage(
    client: openai.OpenAI, srv: dict, ref: ChatReference
) -> None:
    prompt_ids = ref.prompt_ids(HELLO)
    assert prompt_ids[0] == ref.tokenizer.bos_token_id, "the Llama tokenizer adds its BOS"
    [expected] = ref.greedy([prompt_ids], 16)
    out = client.chat.completions.create(
        model=model_name(srv), messages=HELLO, max_tokens=16, temperature=0
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == len(expected)
    assert out.usage.total_tokens == len(prompt_ids) + len(expected)
    assert out.choices[0].message.content == ref.text(expected), (
        f"chat text differs from transformers' greedy tokens {expected}"
    )
    assert out.choices[0].finish_reason == ("length" if len(expected) == 16 else "stop")


def test_chat_stream_joins_to_the_non_streamed_text(client: openai.OpenAI, srv: dict) -> None:
    kwargs = dict(model=model_name(srv), messages=HELLO, max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert (
        finishes[-1] == whole.choices[0].finish_reason and finishes.count(None) == len(finishes) - 1
    )
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_completions_prompt_forms_and_echo(
    client: openai.OpenAI, srv: dict, ref: ChatReference
) -> None:
    prompt = "the cat and the dog"
    ids = ref.tokenizer(prompt)["input_ids"]
    [expected] = ref.greedy([ids], 8)
    by_text = client.completions.create(
        model=model_name(srv), prompt=prompt, max_tokens=8, temperature=0
    )
    by_ids = client.completions.create(
        model=model_name(srv), prompt=ids, max_tokens=8, temperature=0
    )
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == ref.text(expected) == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    batch = client.completions.create(
        model=model_name(srv), prompt=[prompt, "blue green"], max_tokens=4, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == ref.text(expected)[: len(batch.choices[0].text)]
    echoed = client.completions.create(
        model=model_name(srv), prompt=prompt, max_tokens=8, temperature=0, echo=True
    )
    assert echoed.choices[0].text.endswith(by_text.choices[0].text)
    assert prompt in echoed.choices[0].text


def test_n_choices_are_seeded_and_counted(client: openai.OpenAI, srv: dict) -> None:
    kwargs = dict(
        model=model_name(srv), messages=HELLO, max_tokens=12, temperature=1.0, seed=7, n=3
    )
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices], "same seed, same choices"
    assert len(set(texts)) > 1, "the three choices should differ"
    per_choice = client.chat.completions.create(**{**kwargs, "n": 1})
    assert per_choice.choices[0].message.content == texts[0]
    assert first.usage.prompt_tokens == per_choice.usage.prompt_tokens
    assert first.usage.completion_tokens >= 3
    # Choices after the first reuse its prompt blocks from the prefix cache.
    assert first.usage.prompt_tokens_details.cached_tokens >= 16


def test_stop_string_cuts_exactly(client: openai.OpenAI, srv: dict) -> None:
    kwargs = dict(model=model_name(srv), messages=HELLO, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(full) > 8
    stop = full[5:8]
    cut = full[: full.index(stop)]
    out = client.chat.completions.create(**kwargs, stop=[stop])
    assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    kept = client.chat.completions.create(
        **kwargs, stop=[stop], extra_body={"include_stop_str_in_output": True}
    )
    assert kept.choices[0].message.content == cut + stop


def test_bad_words_match_transformers(client: openai.OpenAI, srv: dict, ref: ChatReference) -> None:
    prompt_ids = ref.prompt_ids(HELLO)
    [free] = ref.greedy([prompt_ids], 16)
    # A word the free answer has as one token (alone and after a space): transformers bans
    # one-token words the way vLLM does, whatever the prompt.
    for token in free:
        word = ref.tokenizer.decode([token]).strip()
        banned = bad_words_token_ids([word], ref.tokenizer)
        if banned and all(len(ids) == 1 for ids in banned) and [token] in banned:
            break
    else:
        raise AssertionError(f"no one-token word in {free}")
    model = transformers.AutoModelForCausalLM.from_pretrained(ref.model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt_ids])
    gen = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
        bad_words_ids=banned,
    )  # fmt: skip
    expected = ref.text(gen[0, len(prompt_ids) :].tolist())
    assert expected != ref.text(free)
    kwargs = dict(model=model_name(srv), max_tokens=16, temperature=0)
    body = {"bad_words": [word]}
    chat = client.chat.completions.create(messages=HELLO, **kwargs, extra_body=body)
    assert chat.choices[0].message.content == expected
    streamed = client.completions.create(prompt=prompt_ids, stream=True, **kwargs, extra_body=body)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_length_finish_and_logprob_shapes(client: openai.OpenAI, srv: dict) -> None:
    out = client.chat.completions.create(
        model=model_name(srv), messages=HELLO, max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 5
    content = choice.logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob <= 0 and item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        # greedy: the chosen token is the most likely one
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
    assert (
        "".join(bytes(i.bytes).decode("utf-8", "replace") for i in content)
        == choice.message.content
    )
    comp = client.completions.create(
        model=model_name(srv), prompt="red blue", max_tokens=4, temperature=0, logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = comp.choices[0].logprobs
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    )
    assert all(len(top) == 2 for top in lp.top_logprobs)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": HELLO, "temperature": -1}, 400, "temperature"),
        ({"messages": HELLO, "top_p": 1.5}, 400, "top_p"),
        ({"messages": HELLO, "n": 0}, 400, "n"),
        ({"messages": HELLO, "logprobs": True, "top_logprobs": 25}, 400, "top_logprobs"),
        ({"messages": HELLO, "max_tokens": SESSION_LEN}, 400, "max_tokens"),
        ({"messages": HELLO, "model": "no-such-model"}, 404, "model"),
        ({"messages": HELLO, "seed": 2**64}, 400, "seed"),
        ({"messages": HELLO, "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),
        ({"messages": [{"role": "assistant", "content": "no user turn"}]}, None, None),
    ],
)
def test_bad_requests_get_openai_errors(
    client: openai.OpenAI, srv: dict, body: object, status: int, param: str | None
) -> None:
    resp = post(srv, "/v1/chat/completions", body)
    if status is None:  # whatever the template makes of it: an answer or a 400, never a 500
        assert resp.status_code in (200, 400), resp.text
        assert_healthy(client, srv)
        return
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert_healthy(client, srv)


def test_too_long_prompt_names_both_numbers(client: openai.OpenAI, srv: dict) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model_name(srv), messages=HELLO, max_tokens=SESSION_LEN - 5
        )
    message = err.value.body["message"]
    assert str(SESSION_LEN - 5) in message and str(SESSION_LEN) in message
    assert_healthy(client, srv)


def test_body_too_large_unknown_route_and_auth(client: openai.OpenAI, srv: dict) -> None:
    big = {"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}
    assert post(srv, "/v1/chat/completions", big).status_code == 413
    missing = post(srv, "/v1/nothing-here", {})
    assert missing.status_code == 404 and "error" in missing.json()
    denied = post(srv, "/v1/chat/completions", {"messages": HELLO}, key="wrong")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(srv["url"] + "/health").status_code == 200  # no key needed
    assert_healthy(client, srv)


def test_disconnect_mid_stream_aborts_and_frees_blocks(client: openai.OpenAI, srv: dict) -> None:
    url = srv["url"]
    total = srv["config"].num_kv_blocks  # all free when nothing runs (cached blocks count)
    stream = client.chat.completions.create(
        model=model_name(srv), messages=HELLO, max_tokens=400, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 3:
            break
    wait_for(lambda: metrics(url)["vlmserve:num_requests_running"] >= 1, 10, "it to run")
    stream.close()  # the client goes away mid-stream
    wait_for(
        lambda: (
            metrics(url)["vlmserve:num_requests_running"] == 0
            and metrics(url)["vlmserve:kv_cache_free_blocks"] == total
        ),
        10,
        "the aborted request to free its blocks",
    )


def test_tokenizer_endpoints(srv: dict, ref: ChatReference) -> None:
    encoded = post(srv, "/v1/encode", {"input": "hello there"}).json()
    assert encoded["input_ids"] == ref.tokenizer("hello there")["input_ids"]
    assert encoded["length"] == len(encoded["input_ids"])
    tokenized = post(srv, "/tokenize", {"messages": HELLO}).json()
    assert (
        tokenized["tokens"] == ref.prompt_ids(HELLO) and tokenized["max_model_len"] == SESSION_LEN
    )
    text = post(srv, "/detokenize", {"tokens": encoded["input_ids"]}).json()["prompt"]
    assert "hello there" in text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),  # was a 500: the template refuses an empty conversation
        ({}, "prompt"),
        ({"prompt": "x", "messages": HELLO}, "prompt"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ],
)
def test_tokenize_refusals_are_400s_naming_the_field(
    client: openai.OpenAI, srv: dict, body: dict, param: str
) -> None:
    resp = post(srv, "/tokenize", body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert_healthy(client, srv)


def test_openapi_spec_is_valid_and_docs_are_local(srv: dict) -> None:
    spec = httpx.get(srv["url"] + "/openapi.json").json()
    validate(spec)
    assert "/v1/chat/completions" in spec["paths"]
    for path in ("/", "/docs"):
        page = httpx.get(srv["url"] + path)
        assert page.status_code == 200 and "/static/swagger/swagger-ui-bundle.js" in page.text
        assert "https://" not in page.text and "cdn" not in page.text.lower(), "assets are local"
    bundle = httpx.get(srv["url"] + "/static/swagger/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000


def test_server_log_has_no_tracebacks(srv: dict) -> None:
    with open(srv["log"]) as f:
        log = f.read()
    assert "Traceback" not in log, log[-3000:]
    assert os.path.getsize(srv["log"]) > 0
