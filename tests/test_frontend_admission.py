"""The frontend's admission wrapper, driven as an ASGI app (no server): --max-concurrent-requests
and draining, with an inner app whose requests last until the test lets them end."""

from __future__ import annotations

import asyncio
import json

from vlmserve.frontend.admission import Admission


class SlowApp:
    """Answers 200 once `release` is set; counts the requests it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen = 0

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001
        self.seen += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Admission, path: str, method: str = "POST") -> tuple[int, dict, dict]:
    """Status, headers and JSON body (empty when not JSON) of one request through `app`."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": method, "path": path}
    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    body = sent[1]["body"]
    return sent[0]["status"], headers, json.loads(body) if body != b"ok" else {}


def test_max_concurrent_requests_refuses_generation_past_the_cap() -> None:
    async def scenario() -> None:
        inner = SlowApp()
        app = Admission(inner, max_concurrent=2, drain_timeout=5, cut=lambda _: None)
        running = [asyncio.create_task(call(app, "/v1/completions")) for _ in range(2)]
        await asyncio.sleep(0.01)
        status, headers, body = await call(app, "/v1/chat/completions")
        assert status == 503 and headers["retry-after"] == "1"
        assert body["error"]["code"] == "service_unavailable"
        assert "--max-concurrent-requests" in body["error"]["message"]
        assert inner.seen == 2  # the refused request never reached the app
        other = asyncio.create_task(call(app, "/v1/models", "GET"))  # not a generation
        await asyncio.sleep(0.01)
        assert inner.seen == 3
        inner.release.set()
        assert [s for s, _, _ in await asyncio.gather(*running, other)] == [200, 200, 200]
        assert app.in_flight == app.generating == 0
        assert (await call(app, "/v1/completions"))[0] == 200  # room again

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_drain_refuses_new_requests_and_waits_for_those_in_flight() -> None:
    async def scenario() -> None:
        inner = SlowApp()
        cuts: list[str] = []
        app = Admission(inner, max_concurrent=0, drain_timeout=5, cut=cuts.append)
        running = asyncio.create_task(call(app, "/v1/completions"))
        await asyncio.sleep(0.01)
        drain = asyncio.create_task(app.drain())
        await asyncio.sleep(0.01)
        for path in ("/health", "/v1/completions", "/v1/models"):
            status, headers, body = await call(app, path, "GET")
            assert status == 503 and "shutting down" in body["error"]["message"], path
        metrics = asyncio.create_task(call(app, "/metrics", "GET"))  # still answered
        await asyncio.sleep(0.05)
        assert not drain.done()
        inner.release.set()
        await asyncio.gather(drain, running, metrics)
        assert running.result()[0] == metrics.result()[0] == 200 and cuts == []

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_drain_timeout_ends_what_is_left_with_an_error() -> None:
    async def scenario() -> None:
        inner = SlowApp()
        cuts: list[str] = []

        def cut(error: str) -> None:  # SchedulerClient.fail_all: the routes then answer
            cuts.append(error)
            inner.release.set()

        app = Admission(inner, max_concurrent=0, drain_timeout=0.2, cut=cut)
        running = asyncio.create_task(call(app, "/v1/completions"))
        await asyncio.sleep(0.01)
        await app.drain()
        assert running.done() and app.in_flight == 0
        assert len(cuts) == 1 and "--drain-timeout" in cuts[0]

    asyncio.run(asyncio.wait_for(scenario(), 10))
