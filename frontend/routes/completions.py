"""POST /v1/completions: OpenAI (legacy) text completions, one prompt or a batch of them."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import falcon.asgi
from falcon.asgi import SSEvent

from vlmserve.frontend.errors import APIError, bad_request, service_unavailable
from vlmserve.frontend.generation import (
    ChoiceDelta,
    EnginePrompt,
    TextOptions,
    collect_choices,
    first_delta,
    generate_choices,
    prepend,
)
from vlmserve.frontend.prompt_logprobs import echoed_part, end_offset, joined, requested
from vlmserve.frontend.request_log import request_record
from vlmserve.frontend.request_timeout import RequestTimeout
from vlmserve.frontend.routes.chat import encoder, sse
from vlmserve.frontend.sampling_params import to_sampling_params
from vlmserve.frontend.schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    make_usage,
)
from vlmserve.frontend.state import FrontendState
from vlmserve.frontend.validation import completion_prompts, decode_request
from vlmserve.shared.messages import PromptLogprobs, TokenLogprob


def completion_logprobs(
    state: FrontendState, token_ids: list[int], lps: list[TokenLogprob], offset: int
) -> CompletionLogprobs:
    """OpenAI's legacy parallel lists; `offset` is where these tokens' text starts."""
    texts = state.token_texts
    out = CompletionLogprobs()
    for token, lp in zip(token_ids, lps, strict=True):
        text = texts.text_of(token)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append(
            {texts.text_of(t): v for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)}
        )
        out.text_offset.append(offset)
        offset += len(text)
    return out


class CompletionsResource:
    def __init__(self, state: FrontendState) -> None:
        self.state = state

    async def tokenize(self, prompts: list[str | list[int]]) -> list[list[int]]:
        prompter = self.state.prompter
        return [
            list(p) if isinstance(p, list) else await self.state.off_loop(prompter.encode, p)
            for p in prompts
        ]

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        state = self.state
        arrived = time.monotonic()  # the request's timeout counts from here
        body = decode_request(await state.read_body(req), CompletionRequest)
        state.check_model(body.model)
        prompts = await self.tokenize(completion_prompts(body))
        vocab = len(state.prompter.tokenizer)
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        rooms = [state.prompter.check_length(len(p), body.max_tokens) for p in prompts]
        tokenizer = state.prompter.tokenizer
        sampling = await state.off_loop(  # building a grammar may import xgrammar
            to_sampling_params, body, min(rooms), tokenizer, state.sampling_defaults,
            state.vocab_size,
        )  # fmt: skip
        if not await state.scheduler.ready():
            raise service_unavailable("the engine is not running")
        text = TextOptions.of(body)
        engine_prompts = [EnginePrompt(p) for p in prompts]
        timeout = RequestTimeout.of(body.timeout, state.config.request_timeout, arrived)
        deltas = generate_choices(
            state.scheduler, tokenizer, engine_prompts, sampling, body.n, text, timeout=timeout
        )
        record = request_record(req)
        deltas = record.watch(engine_prompts, body.n, deltas)
        echoes = [state.prompter.tokenizer.decode(p) if body.echo else "" for p in prompts]
        reply = Completion(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=state.model_name,
            choices=[],
        )  # fmt: skip
        record.id = reply.id
        if body.stream:
            deltas = prepend(await first_delta(deltas), deltas)  # errors before it: a status
            resp.sse = self.stream(body, deltas, reply, echoes, prompts)
        else:
            resp.data = encoder.encode(await self.collect(body, deltas, reply, echoes, prompts))
            resp.content_type = falcon.MEDIA_JSON

    async def collect(
        self,
        body: CompletionRequest,
        deltas: AsyncIterator[ChoiceDelta],
        reply: Completion,
        echoes: list[str],
        prompts: list[list[int]],
    ) -> Completion:
        choices, cached = await collect_choices(deltas, len(echoes) * body.n)
        texts = self.state.token_texts
        reply.choices = []
        for i, c in enumerate(choices):
            echo, prompt = echoes[i // body.n], prompts[i // body.n]
            scores = choices[i - i % body.n].prompt_logprobs  # the prompt's first choice has them
            lps = None
            if body.logprobs is not None:
                head = echoed_part(texts, body, prompt, scores)
                offset = end_offset(head) if head else len(echo)
                lps = completion_logprobs(self.state, c.token_ids, c.logprobs, offset)
                lps = joined(head, lps) if head else lps
            choice = CompletionChoice(
                text=echo + c.output.content, index=i, logprobs=lps, finish_reason=c.finish_reason,
                prompt_logprobs=requested(texts, body.prompt_logprobs, prompt, scores),
            )  # fmt: skip
            reply.choices.append(choice)
        prompt_tokens = sum(len(p) for p in prompts)
        reply.usage = make_usage(prompt_tokens, sum(len(c.token_ids) for c in choices), cached)
        return reply

    async def stream(
        self,
        body: CompletionRequest,
        deltas: AsyncIterator[ChoiceDelta],
        reply: Completion,
        echoes: list[str],
        prompts: list[list[int]],
    ) -> AsyncIterator[SSEvent]:
        count = len(echoes) * body.n
        offsets = [len(echoes[i // body.n]) for i in range(count)]
        echoed = [not body.echo] * count
        # Each prompt's scores, from its first choice's first delta: that choice starts
        # first, and the prompt's other choices only once it has them (generate_choices).
        scores: dict[int, PromptLogprobs] = {}
        completion, cached = 0, 0
        try:
            async with aclosing(deltas) as events:
                async for d in events:
                    completion += len(d.token_ids)
                    cached = max(cached, d.num_cached_tokens)
                    # Completions have no reasoning or tool calls: their parser is plain text.
                    text = d.output.content
                    p = d.index // body.n
                    if d.prompt_logprobs is not None:
                        scores[p] = d.prompt_logprobs
                    head = None
                    if not echoed[d.index]:
                        text = echoes[p] + text
                        head = echoed_part(self.state.token_texts, body, prompts[p], scores.get(p))
                        offsets[d.index] = end_offset(head) if head else offsets[d.index]
                    echoed[d.index] = True
                    lps = None
                    if body.logprobs is not None:
                        lps = completion_logprobs(
                            self.state, d.token_ids, d.logprobs or [], offsets[d.index]
                        )
                        lps = joined(head, lps) if head else lps
                    if lps is not None and lps.tokens:
                        offsets[d.index] = lps.text_offset[-1] + len(lps.tokens[-1])
                    reply.choices = [
                        CompletionChoice(
                            text=text, index=d.index, logprobs=lps, finish_reason=d.finish_reason
                        )
                    ]
                    yield sse(reply)
            if body.stream_options and body.stream_options.include_usage:
                reply.choices = []
                reply.usage = make_usage(sum(len(p) for p in prompts), completion, cached)
                yield sse(reply)
            yield SSEvent(data=b"[DONE]")
        except APIError as err:  # the stream has begun: report the error in it, then close
            yield SSEvent(data=err.to_json())
