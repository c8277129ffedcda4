"""Offline use of a running engine: submit many requests at once and collect the results.

The tests and the engine benchmark drive the engine through this, over the real sockets.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from vlmserve.frontend.scheduler_client import SchedulerClient
from vlmserve.shared.config import Config
from vlmserve.shared.messages import EngineStatus, PromptLogprobs, SamplingParams


@dataclass
class Finished:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    elapsed: float = 0.0
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0


async def _one(
    client: SchedulerClient, request_id: str, prompt: list[int], sp: SamplingParams
) -> Finished:
    started = time.monotonic()
    out = Finished()
    async for output in client.generate(request_id, prompt, sp):
        out.token_ids.extend(output.token_ids)
        out.finish_reason, out.error = output.finish_reason, output.error
        out.prompt_logprobs = out.prompt_logprobs or output.prompt_logprobs
        out.num_cached_tokens = output.num_cached_tokens
    out.elapsed = time.monotonic() - started
    return out


async def _wait_alive(client: SchedulerClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not client.alive:
        if time.monotonic() > deadline:
            raise TimeoutError("engine did not come up")
        await asyncio.sleep(0.1)


async def run_async(
    config: Config, requests: list[tuple[list[int], SamplingParams]], timeout: float = 120.0
) -> tuple[list[Finished], EngineStatus | None]:
    client = SchedulerClient(config)
    await client.start(timeout)
    try:
        await _wait_alive(client, timeout)
        jobs = [_one(client, f"r{i}", p, sp) for i, (p, sp) in enumerate(requests)]
        results = await asyncio.wait_for(asyncio.gather(*jobs), timeout)
        await asyncio.sleep(0.6)  # one more status publication, counting the last step
        return list(results), client.status
    finally:
        await client.close()


def run_requests(
    config: Config, requests: list[tuple[list[int], SamplingParams]], timeout: float = 120.0
) -> tuple[list[Finished], EngineStatus | None]:
    """Submit all requests at once; wait for all; return them and the engine's last status."""
    return asyncio.run(run_async(config, requests, timeout))
