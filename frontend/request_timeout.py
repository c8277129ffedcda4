"""A request's own time limit: its `timeout` field, else --request-timeout, from its arrival.

Past it, the answer ends with a 408 in OpenAI's error shape (a stream that has begun gets it
as its last event); leaving the generation aborts the engine requests, which frees their KV
blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

from vlmserve.frontend.errors import request_timeout

T = TypeVar("T")


class RequestTimeout:
    """The deadline of one request, counted from `started` (time.monotonic())."""

    def __init__(self, seconds: float, started: float) -> None:
        self.seconds = seconds
        self.deadline = started + seconds

    @classmethod
    def of(cls, asked: float | None, default: float, started: float) -> RequestTimeout | None:
        """The request's `timeout` if it set one, else the server's; None when neither is."""
        seconds = asked if asked is not None else default
        return cls(seconds, started) if seconds > 0 else None

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, or the 408 APIError once the deadline has passed."""
        try:
            # Not wait_for, which makes a task per call (once per token of a stream).
            async with asyncio.timeout(max(self.deadline - time.monotonic(), 0)):
                return await awaitable
        except TimeoutError:
            raise request_timeout(self.seconds) from None
