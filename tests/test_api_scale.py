"""Many clients at once, frontends scaled out, and the engine going away under them.

Real processes throughout: Gunicorn with two frontend workers, plus a frontend started on
its own (another port) that joins the running scheduler, as a frontend on another host would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import msgspec
import openai
import pytest
from server_fixtures import ChatReference, free_port, local_config, wait_for

from vlmserve.deploy.launcher import server, spawn, start_scheduler_and_workers, stop, wait_healthy

PROMPTS = [[{"role": "user", "content": f"tell me about the {w} {i}"}] for i, w in enumerate(
    ["cat", "dog", "red photo", "blue model", "green server", "stream", "batch", "cache"]
)]  # fmt: skip


async def stream_text(url: str, messages: list[dict], max_tokens: int) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="llama", messages=messages, max_tokens=max_tokens, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await client.close()


def test_64_streaming_clients_over_three_frontends(checkpoints: dict, workdir: str) -> None:
    ref = ChatReference(checkpoints["llama"])
    expected = [ref.text(t) for t in ref.greedy([ref.prompt_ids(p) for p in PROMPTS], 16)]
    config = local_config(checkpoints["llama"], workdir, frontend_workers=2, max_batch_size=64)
    with server(config, os.path.join(workdir, "server.log")) as srv:
        extra = msgspec.structs.replace(config, server_port=free_port(), frontend_workers=1)
        lone = spawn("frontend", extra, os.path.join(workdir, "lone-frontend.log"))
        try:
            lone_url = f"http://127.0.0.1:{extra.server_port}"
            wait_healthy(lone_url, {"frontend": lone}, timeout=60)
            urls = [srv["url"], lone_url]

            async def everyone() -> list[str]:
                jobs = [stream_text(urls[i % 2], PROMPTS[i % 8], 16) for i in range(64)]
                return await asyncio.gather(*jobs)

            texts = asyncio.run(asyncio.wait_for(everyone(), 240))
        finally:
            stop(lone)
    for i, text in enumerate(texts):
        assert text == expected[i % 8], f"client {i} (frontend {i % 2}) got {text!r}"


def test_engine_failure_is_a_clear_error_not_a_hang(checkpoints: dict, workdir: str) -> None:
    config = local_config(checkpoints["llama"], workdir, worker_timeout=2.0)
    with server(config, os.path.join(workdir, "server.log")) as srv:
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(
            model="llama", messages=PROMPTS[0], max_tokens=1500, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        received = 0
        with pytest.raises(openai.APIError) as err:
            for _ in stream:
                received += 1
                if received == 3:
                    killed_at = time.monotonic()
                    os.kill(srv["procs"]["worker0"].pid, signal.SIGKILL)
        assert time.monotonic() - killed_at < 8, "the stream must fail soon after the worker died"
        assert "worker" in str(err.value.message)
        assert srv["procs"]["scheduler"].wait(timeout=10) != 0
        health = wait_for(
            lambda: (r := httpx.get(srv["url"] + "/health")).status_code == 503 and r, 10, "503"
        )
        assert health.json()["error"]["code"] == "service_unavailable"
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model="llama", messages=PROMPTS[0], max_tokens=4)
        assert refused.value.status_code == 503 and time.monotonic() - started < 2


def test_frontend_rejoins_a_restarted_engine(checkpoints: dict, workdir: str) -> None:
    """Scheduler and worker restarted under a running frontend (as a supervisor does): the
    frontend notices the new scheduler, says hello again, and serves."""
    config = local_config(checkpoints["llama"], workdir)
    log_path = os.path.join(workdir, "server.log")
    with server(config, log_path) as srv:
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        first = client.chat.completions.create(
            model="llama", messages=PROMPTS[1], max_tokens=6, temperature=0
        )
        for name in ("scheduler", "worker0"):
            stop(srv["procs"][name])
        wait_for(lambda: httpx.get(srv["url"] + "/health").status_code == 503, 10, "503")
        srv["procs"].update(start_scheduler_and_workers(config, log_path))
        wait_for(lambda: httpx.get(srv["url"] + "/health").status_code == 200, 60, "200 again")
        again = client.chat.completions.create(
            model="llama", messages=PROMPTS[1], max_tokens=6, temperature=0
        )
    assert again.choices[0].message.content == first.choices[0].message.content
