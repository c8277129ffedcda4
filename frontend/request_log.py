"""One generation request from arrival to its last byte: its metrics and its completion line.

`RequestRecorder` (middleware) gives every POST to a generation route a `RequestRecord`; the
route tells it what it learned (its id, the images), and passes the engine's deltas through
`record.watch`. The record observes time to first token, inter-token gaps and queue time as
they happen, and when the answer is complete (the JSON body sent, the stream ended, the
client gone) it observes the per-request histograms and writes one log line: id, status,
prompt and output tokens, images, TTFT, total time and finish reasons; the prompt text only
with --log-requests.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import falcon
import falcon.asgi

from vlmserve.frontend.detokenizer import Tokenizer
from vlmserve.frontend.errors import APIError
from vlmserve.frontend.generation import ChoiceDelta, EnginePrompt
from vlmserve.frontend.metrics import FrontendMetrics

log = logging.getLogger("vlmserve.requests")

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer ended


@dataclass
class ChoiceTimes:
    first: float | None = None  # monotonic time of its first token
    last: float | None = None
    ended: float | None = None
    tokens: int = 0
    finish: str | None = None


class RequestRecord:
    def __init__(
        self, metrics: FrontendMetrics, endpoint: str, tokenizer: Tokenizer, log_prompts: bool
    ) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.tokenizer = tokenizer
        self.log_prompts = log_prompts
        self.arrived = time.monotonic()
        self.id = f"req-{uuid.uuid4().hex}"  # until the route names its answer
        self.prompt_lens: list[int] = []
        self.n = 1
        self.images = 0
        self.choices: dict[int, ChoiceTimes] = {}
        self.error_status: int | None = None  # an error reported inside a begun stream
        self.prompt_text: list[str] | None = None
        self.finished = False

    def images_ready(self, count: int, seconds: float) -> None:
        """The request's `count` images were fetched, decoded and processed in `seconds`."""
        self.images = count
        if count:
            self.metrics.images.inc(count)
            self.metrics.request_images.observe(count)
            self.metrics.image_seconds.observe(seconds)

    async def watch(
        self, prompts: Sequence[EnginePrompt], n: int, deltas: AsyncIterator[ChoiceDelta]
    ) -> AsyncIterator[ChoiceDelta]:
        """`deltas` unchanged, observed on the way (closing this closes them)."""
        self.prompt_lens = [len(p.token_ids) for p in prompts]
        self.n = n
        if self.log_prompts:
            self.prompt_text = [self.tokenizer.decode(p.token_ids) for p in prompts]
        try:
            async with aclosing(deltas) as events:
                async for d in events:
                    self._observe(d)
                    yield d
        except APIError as err:
            self.error_status = err.status
            raise

    def _observe(self, d: ChoiceDelta) -> None:
        now = time.monotonic()
        times = self.choices.setdefault(d.index, ChoiceTimes())
        if d.token_ids:
            if times.first is None:
                times.first = now
                self.metrics.ttft.observe(now - self.arrived)
            else:
                self.metrics.itl.observe(now - times.last)
            times.last = now
            times.tokens += len(d.token_ids)
            self.metrics.generation_tokens.inc(len(d.token_ids))
        if d.finish_reason is not None:
            times.finish, times.ended = d.finish_reason, now

    async def stream_until_done(self, events: AsyncIterator) -> AsyncIterator:
        """A streamed answer's events unchanged; the record finishes when they end (or when
        the client goes away and the server closes them)."""
        completed = False
        try:
            async with aclosing(events) as inner:
                async for event in inner:
                    yield event
            completed = True
        finally:
            self.finish(200 if completed else CLIENT_CLOSED)

    def finish(self, status: int) -> None:
        """Observe the per-request metrics and write the completion line, once."""
        if self.finished:
            return
        self.finished = True
        status = self.error_status or status
        now = time.monotonic()
        reasons = []
        for index in range(len(self.prompt_lens) * self.n):
            times = self.choices.get(index, ChoiceTimes())
            reason = times.finish or ("abort" if status == CLIENT_CLOSED else "error")
            reasons.append(reason)
            self.metrics.success(reason)
            self.metrics.e2e.observe((times.ended or now) - self.arrived)
            self.metrics.request_prompt_tokens.observe(self.prompt_lens[index // self.n])
            self.metrics.request_generation_tokens.observe(times.tokens)
        if any(t.first is not None for t in self.choices.values()):
            self.metrics.prompt_tokens.inc(sum(self.prompt_lens))  # prefilled (once per prompt)
        self.metrics.answered(status)
        self._log(status, reasons, now)

    def _log(self, status: int, reasons: list[str], now: float) -> None:
        firsts = [t.first for t in self.choices.values() if t.first is not None]
        ttft = round(min(firsts) - self.arrived, 6) if firsts else None
        fields = {
            "request_id": self.id,
            "endpoint": self.endpoint,
            "status": status,
            "prompt_tokens": sum(self.prompt_lens),
            "output_tokens": sum(t.tokens for t in self.choices.values()),
            "images": self.images,
            "n": self.n,
            "ttft_s": ttft,
            "total_s": round(now - self.arrived, 6),
            "finish_reason": ",".join(reasons) or None,
        }
        if self.prompt_text is not None:
            fields["prompt"] = (
                self.prompt_text[0] if len(self.prompt_text) == 1 else self.prompt_text
            )
        summary = " ".join(f"{k}={v}" for k, v in fields.items() if k != "prompt")
        if "prompt" in fields:
            summary += f" prompt={fields['prompt']!r}"
        log.info("request done: %s", summary, extra={"fields": {"event": "request", **fields}})


class RequestRecorder:
    """Falcon middleware: a RequestRecord for each generation request, finished with the
    answer (for a stream: when the stream ends)."""

    def __init__(self, metrics: FrontendMetrics, tokenizer: Tokenizer, log_prompts: bool) -> None:
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.log_prompts = log_prompts

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if req.method == "POST" and req.path in GENERATION_PATHS:
            req.context.record = RequestRecord(
                self.metrics, req.path, self.tokenizer, self.log_prompts
            )

    async def process_response(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: object,
        req_succeeded: bool,
    ) -> None:
        record: RequestRecord | None = getattr(req.context, "record", None)
        if record is None:
            return
        status = falcon.http_status_to_code(resp.status)
        if resp.sse is not None and req_succeeded:
            resp.sse = record.stream_until_done(resp.sse)
        else:
            record.finish(status)


def request_record(req: falcon.asgi.Request) -> RequestRecord:
    """The record RequestRecorder gave this request."""
    return req.context.record
