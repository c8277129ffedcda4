"""Runs the `n` choices of one prompt on the engine and turns their tokens into answer deltas.

Shared by chat and text completions, streamed or not: each choice's tokens go through its
output pipeline (frontend/output.py) into the same `ChoiceDelta`s, so a streamed answer joins
to exactly the non-streamed one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import msgspec

from vlmserve.frontend.detokenizer import TextStream, Tokenizer
from vlmserve.frontend.errors import APIError, bad_request, service_unavailable
from vlmserve.frontend.output import (
    ChoiceOutput,
    OutputDelta,
    OutputParser,
    OutputPipeline,
    PlainText,
)
from vlmserve.frontend.prompts import ProcessedImage
from vlmserve.frontend.request_timeout import RequestTimeout
from vlmserve.frontend.sampling_params import stop_strings
from vlmserve.frontend.scheduler_client import SchedulerClient
from vlmserve.frontend.schemas import SamplingFields
from vlmserve.shared.arrays import to_frames
from vlmserve.shared.messages import (
    ERROR,
    ImageMeta,
    PromptLogprobs,
    SamplingParams,
    TokenLogprob,
)

_request_numbers = itertools.count()


@dataclass(frozen=True)
class EnginePrompt:
    """A prompt as the engine takes it: token ids, and its images with their array frames."""

    token_ids: list[int]
    images: list[ImageMeta] = field(default_factory=list)
    frames: list = field(default_factory=list)

    @classmethod
    def with_images(cls, token_ids: list[int], images: list[ProcessedImage]) -> EnginePrompt:
        metas, frames = [], []
        for image in images:
            array_metas, array_frames = to_frames(image.arrays)
            metas.append(ImageMeta(image.hash, image.offset, image.length, array_metas))
            frames.extend(array_frames)
        return cls(token_ids, metas, frames)


@dataclass(frozen=True)
class TextOptions:
    """How a choice's tokens become text (the request's detokenization fields)."""

    stop: list[str]
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # The text of the token that ended the answer (eos or a stop id) is left out, as vLLM
    # does; set where special tokens are kept for a tool parser (they would show the eos).
    hide_stop_token: bool = False

    @classmethod
    def of(cls, req: SamplingFields) -> TextOptions:
        return cls(
            stop=stop_strings(req),
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
        )


@dataclass
class ChoiceDelta:
    """What one choice got from one engine output: new tokens and what they add to the answer."""

    index: int
    output: OutputDelta
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None  # "stop", "length" (or a parser's) on a choice's last delta
    num_cached_tokens: int = 0
    # The prompt's logprobs, on the first delta of the prompt's first choice when asked.
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class Choice:
    """One choice, whole: what a non-streamed answer reports."""

    output: ChoiceOutput = field(default_factory=ChoiceOutput)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # the first choice's, when asked


async def collect_choices(
    deltas: AsyncIterator[ChoiceDelta], count: int
) -> tuple[list[Choice], int]:
    """Join the deltas of `count` choices; also return the prompt tokens the prefix cache
    served (the most any choice had)."""
    choices = [Choice() for _ in range(count)]
    cached = 0
    async with aclosing(deltas) as events:
        async for d in events:
            choice = choices[d.index]
            choice.output.add(d.output)
            choice.token_ids.extend(d.token_ids)
            choice.logprobs.extend(d.logprobs or [])
            choice.finish_reason = d.finish_reason
            choice.prompt_logprobs = choice.prompt_logprobs or d.prompt_logprobs
            cached = max(cached, d.num_cached_tokens)
    return choices, cached


class EngineError(Exception):
    """The engine failed a request (a worker died, or it refused the request)."""


def _choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice i of a seeded request uses seed + i, so the n choices differ yet reproduce.
    Only the first choice scores the prompt (prompt logprobs): the others start once its
    prompt is cached, and take its blocks."""
    if index == 0:
        return sampling
    seed = None if sampling.seed is None else sampling.seed + index
    return msgspec.structs.replace(sampling, seed=seed, prompt_logprobs=None)


async def _run_choice(
    scheduler: SchedulerClient,
    request_id: str,
    index: int,
    prompt: EnginePrompt,
    sampling: SamplingParams,
    pipeline: OutputPipeline,
    out: asyncio.Queue,
    prefilled: asyncio.Event,
    after: asyncio.Event | None,
) -> None:
    """One choice. `prefilled` is set once its prompt's KV exists (its first output); a
    choice given `after` waits for that of the prompt's first choice, so it reuses those
    blocks from the prefix cache instead of prefilling the same prompt again."""
    if after is not None:
        await after.wait()
    outputs = scheduler.generate(
        request_id, prompt.token_ids, sampling, prompt.images, prompt.frames
    )
    async with aclosing(outputs):
        async for output in outputs:
            prefilled.set()
            if output.finish_reason == ERROR:
                if output.rejected:
                    raise bad_request(output.error or "the engine refused the request")
                if output.overloaded:  # a full queue or a queue timeout: retry later
                    raise service_unavailable(output.error or "the server is overloaded")
                raise EngineError(output.error or "the engine failed this request")
            answer, finish = pipeline.add(output.token_ids, output.finish_reason)
            delta = ChoiceDelta(
                index, answer, output.token_ids, output.logprobs, finish, output.num_cached_tokens,
                prompt_logprobs=output.prompt_logprobs,
            )  # fmt: skip
            await out.put(delta)
            if finish is not None:
                return  # leaving early (a stop string) aborts the engine request


async def generate_choices(
    scheduler: SchedulerClient,
    tokenizer: Tokenizer,
    prompts: list[EnginePrompt],
    sampling: SamplingParams,
    n: int,
    text: TextOptions,
    parser: Callable[[], OutputParser] = PlainText,
    timeout: RequestTimeout | None = None,
) -> AsyncIterator[ChoiceDelta]:
    """Deltas of `n` choices of each prompt, as they come; choice j of prompt p has index
    p * n + j. Each choice's text goes through its own `parser()`. Closing the iterator early
    (a client disconnects) aborts them all."""
    if not scheduler.alive:
        raise service_unavailable("the engine is not running")
    queue: asyncio.Queue = asyncio.Queue()
    base = f"{scheduler.frontend_id}-{next(_request_numbers)}"
    tasks = []
    for p, prompt in enumerate(prompts):
        first_prefilled = asyncio.Event()
        for j in range(n):
            stream = TextStream(
                tokenizer,
                prompt.token_ids,
                text.stop,
                text.include_stop_str_in_output,
                text.skip_special_tokens,
                text.spaces_between_special_tokens,
            )
            index = p * n + j
            pipeline = OutputPipeline(stream, parser(), text.hide_stop_token)
            job = _run_choice(
                scheduler, f"{base}-{index}", index, prompt, _choice_sampling(sampling, j),
                pipeline, queue, first_prefilled if j == 0 else asyncio.Event(),
                None if j == 0 else first_prefilled,
            )  # fmt: skip
            tasks.append(asyncio.create_task(job))
    try:
        for task in tasks:
            task.add_done_callback(lambda t: queue.put_nowait(t))
        done = 0
        while done < len(tasks):
            item = await (timeout.wait(queue.get()) if timeout else queue.get())
            if isinstance(item, asyncio.Task):
                done += 1
                _raise_from(item)
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def first_delta(deltas: AsyncIterator[ChoiceDelta]) -> ChoiceDelta:
    """Wait for the first delta before a stream begins, so that what ends a request before
    any token (a full queue, a queue timeout, its timeout, a refusal) is the answer's HTTP
    status rather than an event in a 200 stream. `deltas` is closed if it fails."""
    try:
        return await anext(deltas)
    except BaseException:
        await deltas.aclose()
        raise


async def prepend(first: ChoiceDelta, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator:
    """`first`, then the rest of `deltas`; closing this closes `deltas`."""
    async with aclosing(deltas) as rest:
        yield first
        async for delta in rest:
            yield delta


def _raise_from(task: asyncio.Task) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, EngineError):
        raise service_unavailable(f"the engine failed the request: {exc}") from exc
    if isinstance(exc, APIError):
        raise exc
    if exc is not None:
        raise service_unavailable(f"the engine could not run the request: {exc}") from exc
