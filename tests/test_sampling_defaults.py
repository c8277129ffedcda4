"""--generation-config: the sampling defaults a checkpoint publishes, read as vLLM reads them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from vlmserve.frontend.sampling_defaults import (
    NO_DEFAULTS,
    SamplingDefaults,
    describe,
    load_sampling_defaults,
    log_sampling_defaults,
)

CORPUS = os.path.join(os.path.dirname(__file__), "data", "realconfigs")
QWEN = os.path.join(CORPUS, "Qwen__Qwen2.5-7B-Instruct")
QWEN_DEFAULTS = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


def write_generation_config(directory: str, **fields: object) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, **fields}, f)
    return directory


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen__Qwen2.5-7B-Instruct", QWEN_DEFAULTS),
        # temperature 1e-6: greedy in effect (the sampler takes the argmax below 1e-5).
        (
            "Qwen__Qwen2.5-VL-7B-Instruct",
            SamplingDefaults(temperature=1e-6, repetition_penalty=1.05),
        ),  # noqa: E501
        # Published without do_sample: vLLM applies them all the same, and so do we.
        ("lmsys__vicuna-7b-v1.5", SamplingDefaults(temperature=0.9, top_p=0.6)),
        ("meta-llama__Llama-3.2-3B-Instruct", SamplingDefaults(temperature=0.6, top_p=0.9)),
        # Only ids and max_length (which vLLM does not read either).
        ("liuhaotian__llava-v1.5-7b", NO_DEFAULTS),
    ],
)
def test_auto_reads_the_published_file(name: str, expected: SamplingDefaults) -> None:
    assert load_sampling_defaults("auto", os.path.join(CORPUS, name)) == expected


def test_vllm_ignores_the_file_and_a_directory_replaces_it(tmp_path) -> None:  # noqa: ANN001
    assert load_sampling_defaults("vllm", QWEN) == NO_DEFAULTS
    other = write_generation_config(str(tmp_path / "mine"), temperature=0.3, max_new_tokens=64)
    assert load_sampling_defaults(other, QWEN) == SamplingDefaults(temperature=0.3, max_tokens=64)
    # A checkpoint without the file (or one of only ids) has no defaults.
    assert load_sampling_defaults("auto", str(tmp_path)) == NO_DEFAULTS


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": "high"}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_p": True}, "min_p"),
    ],
)
def test_values_no_request_could_ask_for_are_refused(tmp_path, fields: dict, named: str) -> None:  # noqa: ANN001
    directory = write_generation_config(str(tmp_path), **fields)
    with pytest.raises(ValueError, match=named) as info:
        load_sampling_defaults("auto", directory)
    assert "generation_config.json" in str(info.value)


def test_a_setting_that_is_no_directory_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, vllm or a directory"):
        load_sampling_defaults("/no/such/dir", QWEN)


def test_the_defaults_in_use_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vlmserve.frontend"):
        assert log_sampling_defaults("auto", QWEN) == QWEN_DEFAULTS
    [record] = caplog.records
    text = record.getMessage()
    assert "temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05" in text
    assert os.path.join(QWEN, "generation_config.json") in text and "vllm" in text
    assert "neutral" in describe(NO_DEFAULTS, "vllm", QWEN)


def test_the_launcher_refuses_a_bad_setting_in_one_line(checkpoints: dict) -> None:
    cmd = [sys.executable, "-m", "vlmserve", "serve", "api_server", checkpoints["llama"]]
    out = subprocess.run(
        [*cmd, "--generation-config", "sometimes"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--generation-config must be auto, vllm or a directory" in lines[0]
