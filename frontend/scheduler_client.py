"""A frontend's connection to the scheduler: submit, abort, and receive token batches.

Every frontend process has its own id (its PUB topic). Before it submits anything it
subscribes and completes a hello round trip, so no token batch is published before the
subscription is live (ZeroMQ's slow-joiner problem). Each batch carries a per-topic
sequence number; a gap means lost tokens and fails every request in flight loudly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from vlmserve.shared.config import Config
from vlmserve.shared.messages import (
    ERROR,
    STATUS_TOPIC,
    Abort,
    EngineMsg,
    EngineStatus,
    FrontendMsg,
    Hello,
    HelloAck,
    ImageMeta,
    RequestOutput,
    SamplingParams,
    Submit,
    TokenBatch,
)
from vlmserve.shared.sockets import Codec, make_socket

log = logging.getLogger("vlmserve.scheduler_client")

HELLO_EVERY_S = 0.2
STATUS_STALE_S = 5.0  # the scheduler publishes status every 0.5 s; allow for a busy host


class SchedulerUnavailable(Exception):
    """The scheduler cannot be reached, or its workers are down."""


def new_frontend_id() -> str:
    return f"fe-{os.getpid()}-{secrets.token_hex(3)}"


class SchedulerClient:
    """One frontend process's sockets to the scheduler: it submits and aborts requests and
    routes each published token batch to the request that awaits it."""

    def __init__(self, config: Config, frontend_id: str | None = None) -> None:
        self.config = config
        self.frontend_id = frontend_id or new_frontend_id()
        self.ctx = zmq.asyncio.Context()
        self.push = make_socket(self.ctx, zmq.PUSH, config.address("requests"), bind=False)
        self.sub = make_socket(self.ctx, zmq.SUB, config.address("tokens"), bind=False)
        self.sub.setsockopt(zmq.SUBSCRIBE, self.frontend_id.encode())
        self.sub.setsockopt(zmq.SUBSCRIBE, STATUS_TOPIC)
        self.codec = Codec(FrontendMsg)
        self.engine_codec = Codec(EngineMsg)
        self.queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self.expected_seq: int | None = None  # None until the hello round trip completes
        self.status: EngineStatus | None = None
        self.status_at = 0.0
        self.instance: str | None = None  # the scheduler's; a new one means it restarted
        self.connected = asyncio.Event()
        self.receiver: asyncio.Task | None = None
        self.hello_task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        """True once connected, while the scheduler publishes status and its workers live."""
        fresh = time.monotonic() - self.status_at < STATUS_STALE_S
        up = self.status is not None and self.status.workers_alive
        return self.connected.is_set() and fresh and up

    async def ready(self, startup_wait: float = 10.0) -> bool:
        """Whether the engine can take a request. A frontend that has not yet heard from the
        scheduler (it just started) waits a little; one that lost it answers at once."""
        deadline = time.monotonic() + startup_wait
        while not (self.connected.is_set() and self.status) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.alive

    async def start(self, timeout: float | None = 30.0) -> None:
        """Subscribe and complete the hello round trip; raise SchedulerUnavailable on timeout
        (None: keep trying, for a frontend started before the scheduler)."""
        self.receiver = asyncio.create_task(self._receive_loop())
        await self._hello(timeout)

    async def _hello(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.connected.is_set():
            if deadline is not None and time.monotonic() > deadline:
                raise SchedulerUnavailable(
                    f"no answer from the scheduler at {self.config.address('requests')}"
                )
            await self._send(Hello(self.frontend_id))
            try:
                await asyncio.wait_for(self.connected.wait(), HELLO_EVERY_S)
            except TimeoutError:
                pass

    async def close(self) -> None:
        for task in (self.receiver, self.hello_task):
            if task is not None:
                task.cancel()
        self.push.close()
        self.sub.close()
        self.ctx.term()

    async def _send(self, msg: FrontendMsg) -> None:
        await self.push.send(self.codec.encode(msg))

    async def _receive_loop(self) -> None:
        while True:
            frames = await self.sub.recv_multipart()
            try:
                msg = self.engine_codec.decode(frames[-1])
            except msgspec.DecodeError:  # not from our scheduler: never let it stop the loop
                log.error("dropped an undecodable message on the token socket")
                continue
            match msg:
                case EngineStatus():
                    self.status, self.status_at = msg, time.monotonic()
                    if self.instance != msg.instance:
                        self._scheduler_changed(msg.instance)
                case HelloAck(seq=seq):
                    self.expected_seq = seq + 1
                    self.connected.set()
                case TokenBatch():
                    self._deliver(msg)

    def _scheduler_changed(self, instance: str) -> None:
        """A (re)started scheduler knows nothing of us or our requests: fail those, say hello."""
        restarted = self.instance is not None
        self.instance = instance
        if not restarted:
            return
        log.warning("the scheduler restarted; failing %d requests, reconnecting", len(self.queues))
        self._fail_all("the engine restarted while the request ran")
        self.connected.clear()
        self.expected_seq = None
        self.hello_task = asyncio.create_task(self._hello(None))

    def fail_all(self, error: str) -> None:
        """End every request this frontend waits for with `error` (a 503), aborting them."""
        self._fail_all(error)

    def _fail_all(self, error: str) -> None:
        """End every request in flight with `error`, and abort them on the scheduler (which
        may still be running them) so their blocks are freed."""
        for request_id, queue in self.queues.items():
            queue.put_nowait(RequestOutput(request_id, [], finish_reason=ERROR, error=error))
        if self.queues:
            ids = list(self.queues)
            asyncio.get_running_loop().create_task(self._abort_all(ids))

    async def _abort_all(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            await self._send(Abort(request_id))

    def _deliver(self, batch: TokenBatch) -> None:
        if batch.seq != self.expected_seq:
            error = f"lost token batches: expected #{self.expected_seq}, got #{batch.seq}"
            log.error("%s; failing %d requests", error, len(self.queues))
            self.expected_seq = batch.seq + 1
            self._fail_all(error)
            return
        self.expected_seq = batch.seq + 1
        for output in batch.outputs:
            queue = self.queues.get(output.request_id)
            if queue is not None:  # absent: the request was already given up
                queue.put_nowait(output)

    async def generate(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        images: list[ImageMeta] | None = None,
        frames: list | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit one request and yield its outputs until one carries a finish reason.

        `frames` are the arrays of `images`, in order. Leaving the iteration early (a client
        that disconnects, a stop string) aborts the request.
        """
        if not self.alive:
            raise SchedulerUnavailable("the engine is not running")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.queues[request_id] = queue
        finished = False
        try:
            submit = Submit(request_id, self.frontend_id, token_ids, sampling, images or [])
            await self.push.send_multipart([self.codec.encode(submit), *(frames or [])])
            while not finished:
                output = await self._next(queue)
                finished = output.finish_reason is not None
                yield output
        finally:
            self.queues.pop(request_id, None)
            if not finished:
                await self._send(Abort(request_id))

    async def _next(self, queue: asyncio.Queue[RequestOutput]) -> RequestOutput:
        """The next output; fail instead of waiting forever when the engine goes away."""
        while True:
            try:
                # asyncio.timeout, not wait_for: wait_for wraps each get in a task of its own,
                # once per token of every stream.
                async with asyncio.timeout(STATUS_STALE_S):
                    return await queue.get()
            except TimeoutError:
                if not self.alive:
                    raise SchedulerUnavailable("the engine stopped while the request ran") from None
