"""The serving benchmark's workload and client: random chat prompts of a set token length,
streamed chat completions sent at a request rate under a concurrency cap, and the latency
statistics (TTFT, TPOT, ITL, end-to-end) of what came back.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx2
import msgspec
import numpy as np
import transformers


@dataclass
class Prompt:
    text: str
    token_ids: list[int]  # the whole chat-templated prompt
    output_len: int


def random_prompts(
    model_dir: str, n: int, input_len: int, output_len: int, seed: int
) -> list[Prompt]:
    """`n` one-turn chats of random vocabulary whose templated prompt has `input_len` tokens.

    Decoding random ids and encoding the text again merges or splits some tokens, so the
    content is grown or cut by the difference until the templated count matches (or ten
    rounds pass, leaving it within a token or two). Counted the way Hugging Face tokenizes a
    chat; each server's own count comes back in its usage chunk."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)

    def templated(text: str) -> list[int]:
        chat = [{"role": "user", "content": text}]
        encoded = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)
        return encoded["input_ids"]

    overhead = len(templated(""))
    prompts = []
    for _ in range(n):
        content = [rng.choice(vocab) for _ in range(max(1, input_len - overhead))]
        for _ in range(10):
            text = tok.decode(content, skip_special_tokens=True)
            ids = templated(text)
            missing = input_len - len(ids)
            if missing == 0:
                break
            if missing > 0:
                content += [rng.choice(vocab) for _ in range(missing)]
            else:
                content = content[:missing]
        prompts.append(Prompt(text, ids, output_len))
    return prompts


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds from when it was sent."""

    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0  # SSE events that carried content
    usage_tokens: int | None = None  # completion_tokens of the usage chunk, when sent
    prompt_tokens: int | None = None

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks


async def stream_chat(client: httpx2.AsyncClient, url: str, payload: dict) -> Outcome:
    out = Outcome()
    started = time.perf_counter()
    last = started
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=payload) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:300]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = msgspec.json.decode(data)
                if "error" in event:
                    out.error = str(event["error"])[:300]
                    return out
                if event.get("usage"):
                    out.usage_tokens = event["usage"]["completion_tokens"]
                    out.prompt_tokens = event["usage"]["prompt_tokens"]
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                    now = time.perf_counter()
                    if out.chunks == 0:
                        out.ttft = now - started
                    else:
                        out.itl.append(now - last)
                    last = now
                    out.chunks += 1
    except httpx2.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.latency = time.perf_counter() - started
    out.ok = out.chunks > 0
    if not out.ok:
        out.error = "no content in the stream"
    return out


async def run_load(
    url: str,
    payloads: list[dict],
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
    progress: Callable[[int], None],
) -> tuple[list[Outcome], float]:
    """Send the payloads with Poisson arrivals at `request_rate` per second (inf: all at once),
    at most `max_concurrency` in flight; return their outcomes and the wall time of it all."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency or len(payloads))
    done = 0
    timeout = httpx2.Timeout(3600.0, connect=30.0)
    limits = httpx2.Limits(max_connections=len(payloads), max_keepalive_connections=len(payloads))

    async with httpx2.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:

        async def one(payload: dict) -> Outcome:
            nonlocal done
            async with limit:
                outcome = await stream_chat(client, url, payload)
            done += 1
            progress(done)
            return outcome

        started = time.perf_counter()
        tasks = []
        for i, payload in enumerate(payloads):
            if i and not math.isinf(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(one(payload)))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.perf_counter() - started


def _stats(name: str, values: list[float]) -> dict[str, float]:
    ms = np.asarray(values, dtype=float) * 1000 if values else np.zeros(1)
    return {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"p99_{name}_ms": float(np.percentile(ms, 99)),
    }


def summarize(outcomes: list[Outcome], wall: float, prompts: list[Prompt]) -> dict:
    """vLLM-style serving metrics of one run; TPOT = (latency - TTFT) / (output tokens - 1)."""
    good = [(o, p) for o, p in zip(outcomes, prompts, strict=True) if o.ok]
    output = sum(o.output_tokens for o, _ in good)
    prompt = sum(o.prompt_tokens or len(p.token_ids) for o, p in good)
    tpot = [(o.latency - o.ttft) / (o.output_tokens - 1) for o, _ in good if o.output_tokens > 1]
    usage = sum(o.usage_tokens is not None for o, _ in good)
    return {
        "completed": len(good),
        "failed": len(outcomes) - len(good),
        "errors": sorted({o.error for o in outcomes if not o.ok})[:5],
        "duration_s": wall,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "content_chunks": sum(o.chunks for o, _ in good),  # ITL is measured between these
        "output_tokens_counted_by": "usage" if usage == len(good) else f"chunks ({usage} usage)",
        "short_outputs": sum(o.output_tokens < p.output_len for o, p in good),
        "long_outputs": sum(o.output_tokens > p.output_len for o, p in good),
        "request_throughput": len(good) / wall,
        "output_throughput": output / wall,
        "total_token_throughput": (prompt + output) / wall,
        **_stats("ttft", [o.ttft for o, _ in good]),
        **_stats("tpot", tpot),
        **_stats("itl", [gap for o, _ in good for gap in o.itl]),
        **_stats("e2el", [o.latency for o, _ in good]),
    }
