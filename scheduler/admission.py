"""Admission control: caps on the waiting queue, and how long a request may wait to start.

The waiting queue is global (every frontend feeds it), so the scheduler is where the caps
are checked: a Submit past a cap is answered at once, in the same loop turn, without an
engine step. Both refusals and queue timeouts are `overloaded` outputs, which frontends
answer with 503 and Retry-After: the request itself is fine, the engine is busy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vlmserve.scheduler.request import Request


@dataclass(frozen=True)
class QueueLimits:
    """--max-queued-requests, --max-queued-tokens and --queue-timeout; 0 turns each off."""

    max_requests: int = 0
    max_tokens: int = 0
    timeout_s: float = 0.0

    def refusal(self, waiting: Iterable[Request], num_tokens: int) -> str | None:
        """Why a new request of `num_tokens` tokens may not join `waiting`; None if it may.

        Preempted requests in `waiting` count too: they hold no blocks, but they are work
        queued ahead of the new one. An empty queue takes any request, so one prompt longer
        than --max-queued-tokens is served (its length is checked against the session).
        """
        if not self.max_requests and not self.max_tokens:
            return None
        queued = list(waiting)
        if self.max_requests and len(queued) >= self.max_requests:
            return (
                f"the server is overloaded: {len(queued)} requests are waiting "
                f"(--max-queued-requests {self.max_requests}); retry later"
            )
        queued_tokens = sum(r.num_tokens for r in queued)
        if self.max_tokens and queued and queued_tokens + num_tokens > self.max_tokens:
            return (
                f"the server is overloaded: {queued_tokens} tokens are waiting and this request "
                f"brings {num_tokens} (--max-queued-tokens {self.max_tokens}); retry later"
            )
        return None

    def expired(self, requests: Iterable[Request], now: float) -> list[Request]:
        """The requests that waited longer than the queue timeout and have no token yet.

        Running ones count too (a long prefill, or preempted before its first token): the
        limit is on the time to the first token, which the client waits for either way.
        """
        if not self.timeout_s:
            return []
        return [r for r in requests if r.num_outputs == 0 and now - r.arrived_at > self.timeout_s]


def timeout_message(waited_s: float, timeout_s: float) -> str:
    return (
        f"the server is overloaded: the request waited {waited_s:.1f}s without starting "
        f"(--queue-timeout {timeout_s:g}); retry later"
    )
