"""Clients generated from the live `/openapi.json`, for real (issue 14).

openapi-generator (the `openapi-generator-cli` package, which bundles its jar; it needs a
Java runtime) makes Python, Go, Rust and Java clients from the document a running server
serves, in one JVM. The generator's own validation must find nothing but the stream chunk
models it cannot see used. The Python client is then installed in a fresh virtual
environment (no vlmserve in it) and drives the server: the answers come back as the
generated models and say what the server says over plain HTTP.

The Go, Rust and Java clients are generated, not compiled: their toolchains fetch
dependencies from registries these machines cannot reach.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import httpx
import pytest
from server_fixtures import local_config

from vlmserve.deploy.launcher import server
from vlmserve.frontend.openapi import OPERATIONS

API_KEY = "sk-generated"
PACKAGE = "vlmclient"
HELLO = "hello there, how are you?"
DRIVER = Path(__file__).with_name("generated_client_driver.py")

# Where each generator puts the API of the "Chat" tag, and how it names an operation's method.
LANGUAGES = {
    "python": (f"{PACKAGE}/api/chat_api.py", lambda op: f"def {snake(op)}("),
    "go": ("api_chat.go", lambda op: f") {op[0].upper()}{op[1:]}("),
    "rust": ("src/apis/chat_api.rs", lambda op: f"pub async fn {snake(op)}("),
    "java": ("src/main/java/org/openapitools/client/api/ChatApi.java", lambda op: f" {op}("),
}
# The stream chunk models are only named in the text/event-stream description (a schema of
# type string there keeps generated methods returning the JSON answer's model), so the
# validator sees them unused; they are generated all the same (checked below).
UNUSED = {"ChatCompletionChunk", "ChatChunkChoice", "ChatDelta", "ChatToolCallDelta",
          "ChatFunctionCallDelta"}  # fmt: skip


def snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def generator(*args: str) -> subprocess.CompletedProcess[str]:
    """openapi-generator's CLI from the jar its PyPI package bundles."""
    java = shutil.which("java")
    assert java, "openapi-generator needs a Java runtime (deploy/setup.sh --test-tools)"
    jar = importlib.resources.files("openapi_generator_cli") / "openapi-generator.jar"
    return subprocess.run(
        [java, "-jar", str(jar), *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def srv(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("generated-srv")
    config = local_config(
        checkpoints["llama"], workdir, frontend_workers=1, api_keys=API_KEY, num_kv_blocks=256
    )
    with server(config, str(workdir / "server.log")) as running:
        yield running


@pytest.fixture(scope="module")
def clients(srv: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four clients, generated in one JVM from the document the server serves."""
    root = tmp_path_factory.mktemp("clients")
    resp = httpx.get(srv["url"] + "/openapi.json", timeout=30)
    assert resp.status_code == 200
    (root / "openapi.json").write_bytes(resp.content)
    configs = []
    for lang in LANGUAGES:
        config = {"generatorName": lang, "inputSpec": str(root / "openapi.json"),
                  "outputDir": str(root / lang),
                  "additionalProperties": {"packageName": PACKAGE}}  # fmt: skip
        (root / f"{lang}.json").write_text(json.dumps(config))
        configs.append(str(root / f"{lang}.json"))
    result = generator("batch", "--fail-fast", "--threads", str(len(configs)), *configs)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Batch generation finished {len(configs)} generators successfully" in output, output
    return root


def test_generator_validates_the_document(clients: Path) -> None:
    result = generator("validate", "-i", str(clients / "openapi.json"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Errors:" not in output, output
    warnings = [line.strip() for line in output.splitlines() if line.strip().startswith("- ")]
    assert {w.removeprefix("- Unused model: ") for w in warnings} == UNUSED, output


@pytest.mark.parametrize("lang", list(LANGUAGES))
def test_each_language_has_a_method_per_operation(clients: Path, lang: str) -> None:
    chat_file, method = LANGUAGES[lang]
    source = (clients / lang / chat_file).read_text()
    assert method("createChatCompletion") in source, f"{lang}: no createChatCompletion method"
    everything = "\n".join(
        path.read_text(errors="replace") for path in (clients / lang).rglob("*") if path.is_file()
    )
    missing = [op.operation_id for op in OPERATIONS if method(op.operation_id) not in everything]
    assert not missing, f"{lang}: no method for {missing}"
    for model in ("ChatCompletionRequest", "ContentPart", "ChatCompletionChunk", "Completion"):
        assert model in everything, f"{lang}: no {model} model"


@pytest.fixture(scope="module")
def driven(srv: dict, clients: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What the generated Python client got from the server, run from a fresh venv."""
    env_dir = tmp_path_factory.mktemp("client-venv")
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    # The client's dependencies (pydantic, urllib3, python-dateutil, typing-extensions) come
    # from the package index, as they would for anyone who installs the generated client.
    # No PYTHONPATH: the fresh venv must see only what was installed into it.
    outside = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    quiet = {**outside, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", str(clients / "python")],
        capture_output=True, text=True, timeout=300, env=quiet,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    model = srv["config"].served_name
    run = subprocess.run(
        [python, str(DRIVER), srv["url"], API_KEY, model],
        capture_output=True, text=True, timeout=120, cwd=env_dir, env=quiet,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


def plain(srv: dict, path: str, body: dict) -> dict:
    """The same request over plain HTTP, for what the answer should say."""
    resp = httpx.post(
        srv["url"] + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    )
    resp.raise_for_status()
    return resp.json()


def test_the_client_runs_without_vlmserve(driven: dict) -> None:
    assert driven["vlmserve_importable"] is False


def test_models_and_health(driven: dict, srv: dict) -> None:
    assert driven["models"] == {
        "type": f"{PACKAGE}.models.model_list.ModelList",
        "ids": [srv["config"].served_name],
    }
    assert driven["health"] == 200


def test_chat_answers_are_typed_and_match_the_server(driven: dict, srv: dict) -> None:
    model = srv["config"].served_name
    expected = plain(srv, "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": HELLO}], "max_tokens": 12,
        "temperature": 0,
    })  # fmt: skip
    choice = expected["choices"][0]
    assert choice["message"]["content"], "a greedy answer with text to compare"
    for key in ("chat", "chat_parts"):  # a string, and a list with one text part
        assert driven[key] == {
            "type": f"{PACKAGE}.models.chat_completion.ChatCompletion",
            "choice_type": f"{PACKAGE}.models.chat_choice.ChatChoice",
            "message_type": f"{PACKAGE}.models.assistant_message.AssistantMessage",
            "content": choice["message"]["content"],
            "finish_reason": choice["finish_reason"],
            "completion_tokens": expected["usage"]["completion_tokens"],
            "model": model,
        }, key
    stream = driven["chat_stream"]
    assert stream["status"] == 200 and stream["done"]
    assert stream["types"] == [f"{PACKAGE}.models.chat_completion_chunk.ChatCompletionChunk"]
    assert stream["text"] == choice["message"]["content"]
    assert stream["completion_tokens"] == expected["usage"]["completion_tokens"]


def test_completion_and_tokenizer(driven: dict, srv: dict) -> None:
    model = srv["config"].served_name
    expected = plain(srv, "/v1/completions", {"model": model, "prompt": "the cat and the dog",
                                              "max_tokens": 8, "temperature": 0})  # fmt: skip
    assert driven["completion"] == {
        "type": f"{PACKAGE}.models.completion.Completion",
        "text": expected["choices"][0]["text"],
        "prompt_tokens": expected["usage"]["prompt_tokens"],
    }
    tokens = plain(srv, "/tokenize", {"model": model, "prompt": HELLO})
    assert driven["tokenizer"]["type"] == f"{PACKAGE}.models.tokenize_response.TokenizeResponse"
    assert driven["tokenizer"]["tokens"] == tokens["tokens"]
    assert driven["tokenizer"]["count"] == tokens["count"] == len(tokens["tokens"])
    text = plain(srv, "/detokenize", {"model": model, "tokens": tokens["tokens"]})["prompt"]
    assert driven["tokenizer"]["detokenized"] == text and HELLO in text
    assert driven["tokenizer"]["detokenized_type"] == (
        f"{PACKAGE}.models.detokenize_response.DetokenizeResponse"
    )


def test_errors_raise_with_the_typed_error_body(driven: dict) -> None:
    error_type = f"{PACKAGE}.models.error_response.ErrorResponse"
    bad = driven["bad_request"]
    assert (bad["exception"], bad["status"], bad["data_type"], bad["param"]) == (
        "BadRequestException",
        400,
        error_type,
        "top_logprobs",
    )
    assert "logprobs" in bad["message"]
    unknown = driven["unknown_model"]
    assert (unknown["exception"], unknown["status"], unknown["code"]) == (
        "NotFoundException",
        404,
        "model_not_found",
    )
    assert "no-such-model" in unknown["message"]
    wrong = driven["wrong_key"]
    assert (wrong["exception"], wrong["status"], wrong["data_type"]) == (
        "UnauthorizedException",
        401,
        error_type,
    )
    assert "API key" in wrong["message"]
