"""Fuzzing the live server from its own /openapi.json with schemathesis (issue 14).

`schemathesis run` against a running server, as a user would run it: every operation the
document lists gets its documented examples, the coverage phase's boundary cases and
Hypothesis-generated requests, valid and invalid ones, from a fixed seed. No answer may be a
5xx; every answer must be one the document describes (status, content type, body schema, each
streamed event's JSON); a request the document calls invalid must be refused. The server is the
tiny Llama checkpoint without API keys, with a short session so the requests stay cheap.

(The CLI rather than schemathesis' pytest plugin: the plugin's fixture-loaded schemas do not
work with pytest 9.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from server_fixtures import local_config

from vlmserve.deploy.launcher import server

SEED = 20240614
EXAMPLES = 40  # per operation in the fuzzing phase; the coverage phase adds its own cases
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
]


@pytest.fixture(scope="module")
def srv(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("fuzz")
    config = local_config(
        checkpoints["llama"], workdir, session_len=96, num_kv_blocks=256, max_body_mb=1
    )
    log = str(workdir / "server.log")
    with server(config, log) as running:
        running["log"], running["workdir"] = log, str(workdir)
        yield running


def test_the_document_of_a_server_without_keys_declares_no_security(srv: dict) -> None:
    document = httpx.get(srv["url"] + "/openapi.json", timeout=10).json()
    assert "security" not in document and "securitySchemes" not in document["components"]


@pytest.mark.timeout(600)  # ~50 s on an idle 2-core machine; several times that when shared
def test_no_5xx_and_every_answer_as_documented(srv: dict) -> None:
    schemathesis = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    command = [
        schemathesis, "run", srv["url"] + "/openapi.json", "--checks", ",".join(CHECKS),
        "--phases", "examples,coverage,fuzzing", "--mode", "all", "--max-examples",
        str(EXAMPLES), "--seed", str(SEED), "--workers", "1", "--request-timeout", "60",
        "--warnings", "off",
    ]  # fmt: skip
    # Its own working directory: schemathesis may write a report folder there.
    run = subprocess.run(command, cwd=srv["workdir"], capture_output=True, text=True, timeout=540)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-12000:]
    assert "Tested: 7" in report and " passed" in report, report[-3000:]


def test_server_log_has_no_tracebacks(srv: dict) -> None:
    with open(srv["log"]) as f:
        log = f.read()
    assert "Traceback" not in log, log[-3000:]
