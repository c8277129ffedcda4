"""Soak: 2,000 mixed requests against one server, then nothing left behind.

The mix: streamed and not, text and images, n = 2, stop strings, 10% of the streams cut by
the client after their first token, 5% invalid (bad JSON, bad fields, a broken image, an
unknown model). Every valid request that the client did not cut must succeed; afterwards no
request runs or waits, every KV block is free, and no process (the Gunicorn master and its
frontend workers, the scheduler, the worker) grew its resident memory by 5% or more between
the 500th and the 2,000th request. Tiny answers keep it to a couple of minutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random

import httpx
import numpy as np
import pytest
from PIL import Image
from server_fixtures import labelled, local_config, metrics, wait_for
from vlm_reference import data_url

from vlmserve.deploy.launcher import server
from vlmserve.workers.demo_vlm import build_llava

pytestmark = [pytest.mark.soak, pytest.mark.timeout(600)]

TOTAL, CHECKPOINT = 2000, 500
CONCURRENCY = 24
WORDS = "the quick brown fox jumps over a lazy dog while seven owls watch".split()


def images() -> list[str]:
    """Four images, as data URLs: few enough that the encoder cache holds them all early."""
    rng = np.random.default_rng(1)
    shapes = [(30, 40), (24, 24), (40, 28), (36, 36)]
    return [
        data_url(Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8))) for s in shapes
    ]


def make_request(i: int, rng: random.Random, urls: list[str]) -> tuple[str, dict | bytes]:
    """(kind, body): kind is "invalid", "cut" (a stream the client drops) or "valid"."""
    text = " ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + f" #{i}"
    content: object = text
    if rng.random() < 0.2:
        content = [
            {"type": "image_url", "image_url": {"url": rng.choice(urls)}},
            {"type": "text", "text": text},
        ]
    body = {
        "model": "ckpt",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": rng.randint(1, 4),
        "temperature": rng.choice([0.0, 1.0]),
        "seed": i,
    }
    roll = rng.random()
    if roll < 0.05:
        return "invalid", invalid_body(i, body)
    if roll < 0.15:  # a long answer, cut after its first token
        # Long enough that it cannot end before the server sees the cut (64 tokens could,
        # on a fast engine, and then count as answered rather than as a 499).
        return "cut", body | {"stream": True, "max_tokens": 1024, "ignore_eos": True}
    if rng.random() < 0.2:
        body["n"] = 2
    if rng.random() < 0.2:
        body["stop"] = rng.sample(["e", "o", " the", "x"], 2)
    if rng.random() < 0.5:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return "valid", body


def invalid_body(i: int, body: dict) -> dict | bytes:
    broken = "data:image/png;base64," + "QUJD" * 8
    return [
        b"{not json",
        body | {"max_tokens": -3},
        body | {"messages": "not a list"},
        body | {"model": "no-such-model"},
        body
        | {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": broken}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ]
        },  # fmt: skip
        body | {"temperature": "hot"},
    ][i % 6]


CUT = "cut"  # run_one's answer for a stream it cut after its first token, as planned


async def run_one(client: httpx.AsyncClient, kind: str, body: dict | bytes) -> str | None:
    """None (or CUT) when the request went as it should; otherwise what went wrong."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if kind == "invalid":
        reply = await client.post("/v1/chat/completions", content=data, headers=headers)
        return None if 400 <= reply.status_code < 500 else f"invalid got {reply.status_code}"
    if not body.get("stream"):
        reply = await client.post("/v1/chat/completions", content=data, headers=headers)
        if reply.status_code != 200:
            return f"{reply.status_code}: {reply.text[:200]}"
        reasons = [c["finish_reason"] for c in reply.json()["choices"]]
        return _check_reasons(reasons, body)
    async with client.stream(
        "POST", "/v1/chat/completions", content=data, headers=headers
    ) as reply:
        if reply.status_code != 200:
            return f"stream {reply.status_code}"
        reasons, done = [], False
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return f"error in stream: {chunk['error']}"
            if kind == "cut" and any(c["delta"].get("content") for c in chunk["choices"]):
                return CUT  # leaving the block closes the connection mid-answer
            reasons += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
    if kind == "cut":
        return None  # it ended before any text (a stop at once): nothing left to cut
    return _check_reasons(reasons, body) if done else "stream ended without [DONE]"


def _check_reasons(reasons: list[str], body: dict) -> str | None:
    if len(reasons) != body.get("n", 1) or not set(reasons) <= {"stop", "length"}:
        return f"finish reasons {reasons}"
    return None


def process_tree(procs: dict) -> dict[str, int]:
    """Every process of the server by role: Gunicorn's workers are the frontend's children."""
    pids = {name: proc.pid for name, proc in procs.items()}
    master = procs["frontend"].pid
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == master:
                pids[f"frontend-worker-{entry}"] = int(entry)
    return pids


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def soak(url: str, plan: list[tuple[str, dict | bytes]], pids: dict) -> tuple[list, dict]:
    """Send the plan with CONCURRENCY in flight; sample RSS at the CHECKPOINT-th completion
    and at the last. Returns the problems (index, kind, what) and the RSS samples."""
    problems, done, samples, cut = [], 0, {}, 0
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(plan):
        queue.put_nowait(item)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def worker() -> None:
            nonlocal done, cut
            while not queue.empty():
                i, (kind, body) = queue.get_nowait()
                try:
                    problem = await run_one(client, kind, body)
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if problem == CUT:
                    cut += 1
                elif problem is not None:
                    problems.append((i, kind, problem))
                done += 1
                if done in (CHECKPOINT, len(plan)):
                    samples[done] = {name: rss_kib(pid) for name, pid in pids.items()}

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return problems, samples | {"cut": cut}


def test_soak_2000_mixed_requests(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("soak")
    model = build_llava(str(root / "ckpt"))
    # oneDNN named, as the default is: its kernels per step size once grew this worker ~50%.
    config = local_config(model, root, frontend_workers=2, num_kv_blocks=256, cpu_gemm="onednn")
    rng = random.Random(0)
    urls = images()
    plan = [make_request(i, rng, urls) for i in range(TOTAL)]
    kinds = [kind for kind, _ in plan]
    assert 0.03 < kinds.count("invalid") / TOTAL < 0.07
    assert 0.07 < kinds.count("cut") / TOTAL < 0.13
    with server(config, str(root / "server.log")) as srv:
        pids = process_tree(srv["procs"])
        assert sum(name.startswith("frontend-worker") for name in pids) == 2, pids
        problems, samples = asyncio.run(soak(srv["url"], plan, pids))
        assert not problems, f"{len(problems)} requests failed, e.g. {problems[:5]}"
        idle = wait_for(
            lambda: (m := metrics(srv["url"]))["vlmserve:num_requests_running"] == 0
            and m["vlmserve:num_requests_waiting"] == 0
            and m["vlmserve:kv_cache_free_blocks"] == m["vlmserve:kv_cache_total_blocks"]
            and m,
            # Reached in well under a second on a quiet machine; 60 s for a loaded CI box,
            # where the last aborts and frees queue behind other jobs (15 s timed out there).
            60, "no running or waiting request and every KV block free",
        )  # fmt: skip
        assert idle["vlmserve:kv_cache_total_blocks"] == 256
        # The server saw the cut streams go: answered 499, their engine requests aborted.
        gone = labelled(idle, "vlmserve:http_requests_total", status="499")
        aborted = labelled(idle, "vlmserve:request_success_total", finished_reason="abort")
        assert samples["cut"] > 0.05 * TOTAL and gone == aborted == samples["cut"], (
            samples["cut"], gone, aborted,
        )  # fmt: skip
    early, late = samples[CHECKPOINT], samples[TOTAL]
    growth = {name: late[name] / early[name] - 1 for name in early}
    report = {name: f"{early[name]} -> {late[name]} KiB ({g:+.1%})" for name, g in growth.items()}
    assert all(g < 0.05 for g in growth.values()), f"RSS grew 5% or more: {report}"
