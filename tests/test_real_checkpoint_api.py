"""A real checkpoint's files served the way a user serves them: `vlmserve serve api_server` with a
Hugging Face hub id (found in an offline hub cache), on Qwen2.5-7B-Instruct's published files
shrunk to a tiny checkpoint (workers/demo_real.py). Its generation_config.json sets sampling
defaults, and its embedding has 152,064 rows for a tokenizer of 151,665 tokens.

- /v1/models lists the model as it was given (the hub id), and requests name it so;
- the checkpoint's sampling defaults apply to the fields a request leaves unset, logged once;
- logprobs of ids that no token spells (forced with logit_bias) are reported, not a 500.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import openai
import pytest
import torch
import transformers
from server_fixtures import free_port

from vlmserve.deploy.cli import _config_parser, process_config
from vlmserve.deploy.launcher import wait_healthy
from vlmserve.frontend.errors import APIError
from vlmserve.frontend.state import FrontendState
from vlmserve.workers.demo_real import build_from_config

CORPUS = os.path.join(os.path.dirname(__file__), "data", "realconfigs")
HUB_ID = "Qwen/Qwen2.5-7B-Instruct"
SNAPSHOT = "5f2e6c3a0e7b4d9c8a1b2c3d4e5f60718293a4b5"  # any commit hash names the snapshot
VOCAB, TOKENIZER_LEN = 152064, 151665
PADDED = [152000, 152063]  # ids the model scores that no token spells
WEATHER = [{"role": "user", "content": "Say something about the weather"}]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """An offline Hugging Face hub cache holding HUB_ID: (cache directory, snapshot)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / SNAPSHOT
    build_from_config(os.path.join(CORPUS, "Qwen__Qwen2.5-7B-Instruct"), str(snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return str(cache), str(snapshot)


@pytest.fixture(scope="module")
def srv(hub_cache: tuple[str, str], tmp_path_factory: pytest.TempPathFactory):
    cache, snapshot = hub_cache
    workdir = tmp_path_factory.mktemp("qwen")
    port = free_port()
    log_path = str(workdir / "server.log")
    flags = [
        "--server-name", "127.0.0.1", "--server-port", str(port), "--ipc-dir", str(workdir),
        "--frontend-workers", "2", "--num-kv-blocks", "256", "--log-level", "INFO",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlmserve", "serve", "api_server", HUB_ID, *flags],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, {"server": proc}, timeout=300)
        yield {"url": url, "snapshot": snapshot, "log": log_path}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(srv: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)


def chat_body(**fields: object) -> dict:
    return {"model": HUB_ID, "messages": WEATHER, "max_tokens": 16} | fields


def post(srv: dict, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv["url"] + path, json=body, timeout=60)


# ---- the served name ---------------------------------------------------------------------------


def test_models_lists_the_hub_id_as_given_and_requests_name_it(srv: dict) -> None:
    listed = httpx.get(srv["url"] + "/v1/models", timeout=10).json()["data"]
    assert [card["id"] for card in listed] == [HUB_ID]
    assert listed[0]["root"] == srv["snapshot"]  # the directory it was resolved to
    assert post(srv, "/v1/chat/completions", chat_body(max_tokens=2)).status_code == 200
    # The snapshot directory's name (what earlier versions listed) and the id's last part are
    # not the served name.
    for other in (SNAPSHOT, "Qwen2.5-7B-Instruct"):
        resp = post(srv, "/v1/chat/completions", chat_body(model=other, max_tokens=2))
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


def test_a_local_path_is_served_as_typed_and_by_its_directory_name(
    hub_cache: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, snapshot = hub_cache
    monkeypatch.chdir(os.path.dirname(snapshot))
    typed = f"./{SNAPSHOT}/"
    args = _config_parser("frontend", "").parse_args(["--model", typed])
    config = process_config(args)
    assert config.model == snapshot and config.served_name == typed
    state = FrontendState(config, None, None, None, None)  # check_model reads only the config
    # As typed, and by the directory's own name (what earlier versions listed).
    for name in (typed, SNAPSHOT, None):
        state.check_model(name)
    for name in ("./other/", f"{SNAPSHOT}/x", snapshot):
        with pytest.raises(APIError, match="does not exist") as info:
            state.check_model(name)
        assert info.value.status == 404
    # --model-name replaces both.
    args = _config_parser("frontend", "").parse_args(["--model", typed, "--model-name", "qwen"])
    named = process_config(args)
    assert named.served_name == "qwen"
    state = FrontendState(named, None, None, None, None)
    state.check_model("qwen")
    for name in (typed, SNAPSHOT):
        with pytest.raises(APIError, match="does not exist"):
            state.check_model(name)


# ---- sampling defaults from generation_config.json ----------------------------------------------


def test_the_defaults_are_logged_once(srv: dict) -> None:
    with open(srv["log"]) as f:
        lines = [line for line in f if "sampling defaults" in line]
    assert len(lines) == 1, lines  # two frontend workers, one line
    assert "temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05" in lines[0]


def test_unset_fields_take_the_checkpoint_defaults(srv: dict) -> None:
    def answer(**fields: object) -> list[str]:
        resp = post(srv, "/v1/chat/completions", chat_body(seed=11, n=3, max_tokens=12, **fields))
        assert resp.status_code == 200, resp.text
        return [c["message"]["content"] for c in resp.json()["choices"]]

    published = answer(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    neutral = answer(temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0)
    assert published != neutral, "the defaults must make a difference for this test to mean much"
    assert answer() == published
    # A request's own fields win, top_k 0 (off) too.
    assert answer(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0) == neutral


def _greedy(model: torch.nn.Module, ids: list[int], **overrides: float) -> list[int]:
    """transformers' greedy answer; the checkpoint's generation_config.json applies unless
    `overrides` replace its fields."""
    prompt = torch.tensor([ids])
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
        **overrides,
    )  # fmt: skip
    return out[0, len(ids) :].tolist()


def _penalty_matters(model: torch.nn.Module, tok: transformers.PreTrainedTokenizerBase) -> tuple:
    """(prompt, transformers' greedy answer) for a prompt whose answer the checkpoint's
    repetition_penalty (1.05, weak) changes: a text followed by its own unpenalized answer, so
    the tokens the model favours next are already in the prompt."""
    for text in ("one two three four five", "the cat and the dog", "red blue green", "hi there"):
        ids = tok(text)["input_ids"]
        prompt = ids + _greedy(model, ids, repetition_penalty=1.0)
        expected = _greedy(model, prompt)
        if expected != _greedy(model, prompt, repetition_penalty=1.0):
            return prompt, expected
    raise AssertionError("no prompt whose greedy answer the repetition penalty changes")


def test_greedy_with_the_default_penalty_matches_transformers(
    srv: dict, client: openai.OpenAI
) -> None:
    # transformers' generate applies the checkpoint's repetition_penalty even when greedy, so
    # a greedy request that sets none must get the same tokens from us.
    tok = transformers.AutoTokenizer.from_pretrained(srv["snapshot"])
    model = transformers.AutoModelForCausalLM.from_pretrained(srv["snapshot"], dtype=torch.float32)
    with torch.no_grad():
        prompt, expected = _penalty_matters(model.eval(), tok)
    out = client.completions.create(model=HUB_ID, prompt=prompt, max_tokens=12, temperature=0)
    assert out.usage.completion_tokens == len(expected)
    assert out.choices[0].text == tok.decode(expected, skip_special_tokens=True), expected


# ---- logprobs of ids past the tokenizer ---------------------------------------------------------


def test_the_checkpoint_pads_its_embedding_past_the_tokenizer(srv: dict) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(srv["snapshot"])
    with open(os.path.join(srv["snapshot"], "config.json")) as f:
        assert json.load(f)["vocab_size"] == VOCAB
    assert len(tok) == TOKENIZER_LEN
    assert all(tok.convert_ids_to_tokens(i) is None for i in PADDED)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_of_ids_no_token_spells(
    srv: dict, client: openai.OpenAI, stream: bool
) -> None:
    bias = {str(PADDED[0]): 100}
    kwargs = dict(
        model=HUB_ID, messages=WEATHER, max_tokens=3, temperature=0, logprobs=True,
        top_logprobs=2, logit_bias=bias,
    )  # fmt: skip
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        content = [
            item
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for item in c.choices[0].logprobs.content
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        out = client.chat.completions.create(**kwargs)
        content, text = out.choices[0].logprobs.content, out.choices[0].message.content
        assert out.choices[0].finish_reason == "length"
    assert len(content) == 3 and text == ""
    for item in content:
        # No string: reported as vLLM does, as "" with no bytes.
        assert (item.token, item.bytes) == ("", [])
        assert item.logprob <= 0 and len(item.top_logprobs) == 2


def test_completion_logprobs_of_ids_no_token_spells(srv: dict) -> None:
    bias = {str(PADDED[0]): 100, str(PADDED[1]): 99}
    body = {"model": HUB_ID, "prompt": "hi", "max_tokens": 2, "temperature": 0, "logprobs": 1,
            "logit_bias": bias}  # fmt: skip
    resp = post(srv, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    logprobs = resp.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["", ""] and logprobs["text_offset"] == [0, 0]
    assert resp.json()["choices"][0]["text"] == ""


def test_logit_bias_past_the_model_vocabulary_is_a_400(srv: dict) -> None:
    for key in (str(VOCAB), "9" * 40):
        resp = post(srv, "/v1/chat/completions", chat_body(logit_bias={key: 1}))
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "logit_bias"
    assert post(srv, "/v1/chat/completions", chat_body(max_tokens=1)).status_code == 200
