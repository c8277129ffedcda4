"""Admission control and time limits on a real server (all processes, loopback).

One server with a batch of 1 and --max-queued-requests 2 (so about 3 requests are held), on
a tiny checkpoint with a 16k context, so a request that holds the batch cannot finish before
its timeout on any CPU (HOLD_TOKENS at a few hundred tokens/s):
- overload: 3x more concurrent requests than it holds; the excess gets 503 + Retry-After in
  OpenAI's shape within 100 ms of its own sending, every accepted request answers as the
  same request does on an idle server, and /metrics counts both;
- a request past its `timeout` ends with a 408 (a stream: a last error event, no [DONE]),
  and a request that waits past --queue-timeout for its first token gets 503 (a stream too:
  its status, since no token came); afterwards every KV block is free again, as the
  scheduler's own status says.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest
import zmq
from server_fixtures import local_config, wait_for

from vlmserve.deploy.launcher import server
from vlmserve.shared.messages import STATUS_TOPIC, EngineMsg, EngineStatus
from vlmserve.shared.sockets import Codec
from vlmserve.workers.demo_checkpoint import build_checkpoint

NUM_BLOCKS = 1040  # 16 tokens each: one HOLD_TOKENS request and a little more
HOLD_TOKENS = 16000
QUEUE_CAP, BATCH = 2, 1
QUEUE_TIMEOUT = 4.0
HOLD = ["hold the line please", "one more long answer", "keep it going"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("overload")
    checkpoint = build_checkpoint(str(workdir / "llama16k"), max_position_embeddings=16384)
    config = local_config(
        checkpoint, workdir, max_batch_size=BATCH, max_batched_tokens=256,
        max_queued_requests=QUEUE_CAP, queue_timeout=QUEUE_TIMEOUT, num_kv_blocks=NUM_BLOCKS,
    )  # fmt: skip
    with server(config, os.path.join(str(workdir), "server.log")) as running:
        yield running


def engine_status(srv: dict) -> EngineStatus:
    """The scheduler's latest status, read from its own socket (it publishes twice a second)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, STATUS_TOPIC)
    sock.connect(srv["config"].address("tokens"))
    try:
        assert sock.poll(5000), "no status from the scheduler"
        return Codec(EngineMsg).decode(sock.recv_multipart()[-1])
    finally:
        sock.close()


def all_blocks_free(srv: dict) -> bool:
    status = engine_status(srv)
    return status.num_running == status.num_waiting == 0 and status.free_blocks == NUM_BLOCKS


def body(prompt: str, max_tokens: int, **extra: object) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            **extra}  # fmt: skip


def answered(srv: dict) -> dict[str, float]:
    """/metrics' count of generation requests answered, by HTTP status."""
    counts = {}
    for line in httpx.get(srv["url"] + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vlmserve:http_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('status="')[1].split('"')[0]] = float(value)
    return counts


def assert_503(resp: httpx.Response, says: str) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"
    error = resp.json()["error"]
    assert error["code"] == "service_unavailable" and error["type"] == "server_error"
    assert says in error["message"], error["message"]


async def timed_post(client: httpx.AsyncClient, path: str, payload: dict) -> tuple:
    started = time.perf_counter()
    resp = await client.post(path, json=payload)
    return resp, time.perf_counter() - started


def test_overload_refuses_the_excess_at_once_and_serves_the_rest(srv: dict) -> None:
    n = 3 * (QUEUE_CAP + BATCH)
    prompts = [f"tell me about request {i % 3}" for i in range(n)]
    with httpx.Client(base_url=srv["url"], timeout=60) as client:
        idle = {p: client.post("/v1/completions", json=body(p, 8)).json() for p in prompts[:3]}

    async def everyone() -> list[tuple]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=srv["url"], timeout=60, limits=limits) as client:
            # Open every connection first: the burst then measures the server, not TCP setup.
            await asyncio.gather(*[client.get("/v1/models") for _ in range(n)])
            return await asyncio.gather(
                *[timed_post(client, "/v1/completions", body(p, 8)) for p in prompts]
            )

    before = answered(srv)
    results = asyncio.run(asyncio.wait_for(everyone(), 120))
    accepted = [(p, r) for p, (r, _) in zip(prompts, results, strict=True) if r.status_code == 200]
    refused = [(r, s) for r, s in results if r.status_code != 200]
    codes = [r.status_code for r, _ in results]
    timings = [round(s * 1000) for _, s in results]
    assert len(accepted) >= QUEUE_CAP and len(refused) >= n // 2, codes
    for resp, seconds in refused:
        assert_503(resp, f"--max-queued-requests {QUEUE_CAP}")
        assert seconds < 0.1, f"a refusal took {seconds * 1000:.0f} ms: {sorted(timings)}"
    for prompt, resp in accepted:
        answer = resp.json()
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["choices"][0]["text"] == idle[prompt]["choices"][0]["text"]
        assert answer["usage"]["completion_tokens"] == 8
    wait_for(lambda: all_blocks_free(srv), 10, "every block free")
    after = answered(srv)
    counted = {code: after.get(code, 0) - before.get(code, 0) for code in ("200", "503")}
    assert counted == {"200": len(accepted), "503": len(refused)}, (before, after)


def test_request_timeout_ends_a_running_request_with_408_and_frees_its_blocks(srv: dict) -> None:
    with httpx.Client(base_url=srv["url"], timeout=60) as client:
        started = time.monotonic()
        resp = client.post("/v1/completions", json=body(HOLD[0], HOLD_TOKENS, timeout=1.0))
        assert 1.0 <= time.monotonic() - started < 5
        assert resp.status_code == 408, resp.text
        error = resp.json()["error"]
        assert error["code"] == "request_timeout" and "timeout of 1 s" in error["message"]
    wait_for(lambda: all_blocks_free(srv), 10, "the timed-out request's blocks to be freed")


def test_queue_timeout_is_503_and_a_timed_out_stream_ends_with_an_error_event(
    srv: dict,
) -> None:
    """A stream fills the batch for 3 * QUEUE_TIMEOUT (its own timeout: the two requests sent
    behind it, once the batch is seen full, must time out first even when seeing that takes
    seconds on a loaded machine); they get no token within QUEUE_TIMEOUT and end with 503."""

    async def scenario() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=srv["url"], timeout=60) as client:

            async def hold(prompt: str) -> list[bytes]:
                payload = body(prompt, HOLD_TOKENS, stream=True, timeout=3 * QUEUE_TIMEOUT)
                async with client.stream("POST", "/v1/completions", json=payload) as resp:
                    assert resp.status_code == 200
                    return [line async for line in resp.aiter_lines() if line]

            holders = [asyncio.create_task(hold(p)) for p in HOLD[:BATCH]]
            await asyncio.to_thread(
                wait_for, lambda: engine_status(srv).num_running == BATCH, 10, "the batch full"
            )
            waiting = [
                timed_post(client, "/v1/completions", body(HOLD[2], 4)),
                timed_post(client, "/v1/completions", body(HOLD[2], 4, stream=True)),
            ]
            return await asyncio.gather(*waiting), await asyncio.gather(*holders)

    waited, held = asyncio.run(asyncio.wait_for(scenario(), 60))
    for resp, seconds in waited:
        assert_503(resp, "--queue-timeout 4")
        assert QUEUE_TIMEOUT <= seconds < QUEUE_TIMEOUT + 3
    for lines in held:
        assert len(lines) > 2 and "data: [DONE]" not in lines
        last = json.loads(lines[-1][len("data: ") :])
        assert last["error"]["code"] == "request_timeout", last
        assert all('"finish_reason":null' in line for line in lines[:-1])
    wait_for(lambda: all_blocks_free(srv), 10, "every block free after the timeouts")
