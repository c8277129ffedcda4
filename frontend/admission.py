"""What one frontend process lets in: --max-concurrent-requests, and draining before it stops.

An ASGI wrapper around the Falcon app rather than Falcon middleware, because a request is
in flight until its last byte is sent, and a streamed answer is sent after every Falcon
hook has run. Refusals are 503s with Retry-After in OpenAI's error shape, answered before
the body is read, so a refusal costs next to nothing.

Draining (SIGTERM, see deploy/gunicorn_worker.py): every new request, /health included,
gets 503 (so a load balancer moves on), while the requests in flight run to their end for
at most --drain-timeout. Those still running then end with a 503 error rather than being
cut off silently. /metrics keeps answering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vlmserve.frontend.errors import APIError, service_unavailable

log = logging.getLogger("vlmserve.frontend")

# The routes that run the engine, and so count against --max-concurrent-requests.
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
ALWAYS_OPEN = ("/metrics",)  # answered while draining too
FLUSH_S = 1.0  # after cutting the last requests off, time for their error to reach the client

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class Admission:
    """The frontend's ASGI app: counts requests in flight and refuses past the caps.

    `cut(error)` ends every engine request this process still waits for with `error`
    (SchedulerClient.fail_all); draining uses it once --drain-timeout has passed.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_concurrent: int,
        drain_timeout: float,
        cut: Callable[[str], None],
    ) -> None:
        self.app = app
        self.max_concurrent = max_concurrent
        self.drain_timeout = drain_timeout
        self.cut = cut
        self.in_flight = 0  # HTTP requests being answered, any route
        self.generating = 0  # those on GENERATION_PATHS
        self.draining = False

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # lifespan events pass through
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        generation = scope["method"] == "POST" and path in GENERATION_PATHS
        refusal = self.refusal(path, generation)
        if refusal is not None:
            await _answer(send, refusal)
            return
        self.in_flight += 1
        self.generating += generation
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.generating -= generation

    def refusal(self, path: str, generation: bool) -> APIError | None:
        if self.draining and path not in ALWAYS_OPEN:
            return service_unavailable("this server is shutting down; retry on another one")
        if generation and self.max_concurrent and self.generating >= self.max_concurrent:
            return service_unavailable(
                f"this server is at its limit of {self.max_concurrent} concurrent requests "
                "(--max-concurrent-requests); retry later"
            )
        return None

    async def drain(self) -> None:
        """Refuse new requests; wait for those in flight, at most --drain-timeout; then end
        what is left with a 503 and give the answers a moment to leave."""
        self.draining = True
        log.info("draining: %d requests in flight", self.in_flight)
        deadline = time.monotonic() + self.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning(
                "drain timeout (%gs): ending %d requests in flight", self.drain_timeout,
                self.in_flight,
            )  # fmt: skip
            self.cut("the server shut down before the request finished (--drain-timeout)")
            deadline = time.monotonic() + FLUSH_S
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        log.info("drained")


async def _answer(send: Callable, err: APIError) -> None:
    body = err.to_json()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *[(k.lower().encode(), v.encode()) for k, v in err.headers.items()],
    ]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
