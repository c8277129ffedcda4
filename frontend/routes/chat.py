"""POST /v1/chat/completions: OpenAI chat completions, streamed (SSE) or as one JSON body."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import falcon.asgi
import msgspec
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
from vlmserve.frontend.media_fetch import load_images
from vlmserve.frontend.output import ChoiceOutput, OutputDelta
from vlmserve.frontend.prompt_logprobs import requested
from vlmserve.frontend.request_log import request_record
from vlmserve.frontend.request_timeout import RequestTimeout
from vlmserve.frontend.sampling_params import to_sampling_params
from vlmserve.frontend.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatFunctionCall,
    ChatFunctionCallDelta,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    ChatToolCall,
    ChatToolCallDelta,
    ImagePart,
    MMProcessorKwargs,
    TopLogprob,
    VideoPart,
    VideoURL,
    make_usage,
)
from vlmserve.frontend.state import FrontendState
from vlmserve.frontend.structured_output import require_chat_template
from vlmserve.frontend.tool_choice import plan_tools
from vlmserve.frontend.validation import decode_request
from vlmserve.frontend.video import load_videos
from vlmserve.shared.messages import TokenLogprob
from vlmserve.shared.models.qwen2_vl import PixelBounds

encoder = msgspec.json.Encoder()


def chat_logprobs(
    state: FrontendState, token_ids: list[int], lps: list[TokenLogprob]
) -> ChatLogprobs:
    texts = state.token_texts
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=texts.text_of(token),
                logprob=lp.logprob,
                bytes=list(texts.bytes_of(token)),
                top_logprobs=[
                    TopLogprob(token=texts.text_of(t), logprob=v, bytes=list(texts.bytes_of(t)))
                    for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
                ],
            )
            for token, lp in zip(token_ids, lps, strict=True)
        ]
    )


def assistant_message(output: ChoiceOutput) -> AssistantMessage:
    """A whole choice's answer; reasoning and tool calls only when the parser found some
    (reasoning under both names, `reasoning_content` and vLLM's newer `reasoning`). An answer
    that is only calls has `content: null`, as OpenAI's."""
    content = output.content or (None if output.tool_calls else "")
    message = AssistantMessage(content=content)
    if output.reasoning_content:
        message.reasoning_content = message.reasoning = output.reasoning_content
    if output.tool_calls:
        message.tool_calls = [
            ChatToolCall(id=c.id, function=ChatFunctionCall(name=c.name, arguments=c.arguments))
            for c in output.tool_calls
        ]
    return message


def chat_delta(output: OutputDelta) -> ChatDelta:
    """What a chunk adds; fields without news are left out, as OpenAI's chunks do."""
    calls = [
        ChatToolCallDelta(
            index=c.index,
            id=c.id,
            type="function" if c.id else None,
            function=ChatFunctionCallDelta(name=c.name, arguments=c.arguments or None),
        )
        for c in output.tool_calls
    ]
    return ChatDelta(
        content=output.content or None,
        reasoning_content=output.reasoning_content or None,
        reasoning=output.reasoning_content or None,
        tool_calls=calls or None,
    )


def image_urls(messages: list[ChatMessage]) -> list[str]:
    """Every image of the conversation, in order (a part's URL may be an object or a string)."""
    urls = []
    for message in messages:
        for part in message.content if isinstance(message.content, list) else []:
            if isinstance(part, ImagePart):
                url = part.image_url
                urls.append(url if isinstance(url, str) else url.url)
    return urls


def video_parts(body: ChatCompletionRequest) -> list[VideoURL]:
    """Every video of the conversation, in order, with the request's `mm_processor_kwargs`
    where the part sets no sampling of its own."""
    kwargs = body.mm_processor_kwargs or MMProcessorKwargs()
    parts = [
        part.video_url if isinstance(part.video_url, VideoURL) else VideoURL(url=part.video_url)
        for message in body.messages
        for part in (message.content if isinstance(message.content, list) else [])
        if isinstance(part, VideoPart)
    ]
    return [
        msgspec.structs.replace(
            part,
            fps=kwargs.fps if part.fps is None else part.fps,
            max_frames=kwargs.max_frames if part.max_frames is None else part.max_frames,
        )
        for part in parts
    ]


def pixel_bounds(body: ChatCompletionRequest, state: FrontendState) -> PixelBounds | None:
    """The request's `mm_processor_kwargs` min_pixels / max_pixels under --mm-max-pixels, for
    a Qwen-VL checkpoint; None where the checkpoint's own bounds apply unchanged. 400 naming
    the field for a family without these knobs, a bound over the ceiling, a max_pixels below
    one merged patch, or a min_pixels above the max_pixels it would be resized within."""
    kwargs = body.mm_processor_kwargs or MMProcessorKwargs()
    asked = {k: getattr(kwargs, k) for k in ("min_pixels", "max_pixels")}
    images = state.prompter.images
    default = getattr(images, "image_size", None)
    cap = state.config.mm_max_pixels
    if default is None:
        for name, value in asked.items():
            if value is not None:
                raise bad_request(
                    f"this model's processor takes no {name} (only the Qwen-VL family's do)",
                    f"mm_processor_kwargs.{name}",
                )
        return None
    ceiling = cap or default["longest_edge"]
    for name, value in asked.items():
        if value is not None and value > ceiling:
            flag = "--mm-max-pixels" if cap else "the checkpoint's max_pixels; --mm-max-pixels"
            raise bad_request(
                f"{name} {value} is over this server's ceiling of {ceiling} pixels ({flag})",
                f"mm_processor_kwargs.{name}",
            )
    smallest = images.factor**2
    if asked["max_pixels"] is not None and asked["max_pixels"] < smallest:
        raise bad_request(
            f"max_pixels {asked['max_pixels']} is below one merged patch "
            f"({images.factor}x{images.factor} = {smallest} pixels)",
            "mm_processor_kwargs.max_pixels",
        )
    pixels = PixelBounds(asked["min_pixels"], asked["max_pixels"], cap)
    if asked["min_pixels"] is None and asked["max_pixels"] is None:
        return pixels if cap else None  # the ceiling may lower the checkpoint's bounds
    size = pixels.size(default)
    if size["shortest_edge"] > size["longest_edge"]:
        name = "min_pixels" if asked["min_pixels"] is not None else "max_pixels"
        mine = {k: "" if v is not None else " (the server's)" for k, v in asked.items()}
        raise bad_request(
            f"min_pixels {size['shortest_edge']}{mine['min_pixels']} is above max_pixels "
            f"{size['longest_edge']}{mine['max_pixels']}",
            f"mm_processor_kwargs.{name}",
        )
    return pixels


def sse(payload: msgspec.Struct | bytes) -> SSEvent:
    data = payload if isinstance(payload, bytes) else encoder.encode(payload)
    return SSEvent(data=data)


class ChatCompletionsResource:
    def __init__(self, state: FrontendState) -> None:
        self.state = state

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        state = self.state
        arrived = time.monotonic()  # the request's timeout counts from here
        body = decode_request(await state.read_body(req), ChatCompletionRequest)
        state.check_model(body.model)
        require_chat_template(body, state.prompter.tokenizer.chat_template is not None)
        urls = image_urls(body.messages)
        if urls and state.prompter.images is None:
            raise bad_request("this model does not accept images", "messages")
        videos = video_parts(body)
        frame_multiple = getattr(state.prompter.images, "video_frame_multiple", None)
        if videos and frame_multiple is None:
            raise bad_request("this model does not accept videos", "messages")
        pixels = pixel_bounds(body, state)
        record = request_record(req)
        started = time.perf_counter()
        images = await load_images(urls, state.config, state.http) if urls else []
        clips = []
        if videos:
            linspace = getattr(state.prompter.images, "video_linspace", False)
            clips = await load_videos(videos, state.config, state.http, frame_multiple, linspace)
        plan = plan_tools(body, state.config.tool_call_parser, state.config.reasoning_parser)
        prompt_ids, processed = await state.off_loop(
            state.prompter.chat_inputs, body.messages, images, plan.tools, clips, pixels
        )
        record.images_ready(len(urls), time.perf_counter() - started)
        asked = body.max_completion_tokens or body.max_tokens
        room = state.prompter.check_length(len(prompt_ids), asked)
        tokenizer = state.prompter.tokenizer
        sampling = await state.off_loop(  # building a grammar may import xgrammar
            to_sampling_params, body, room, tokenizer, state.sampling_defaults, state.vocab_size
        )
        sampling = plan.constrain(sampling)
        if not await state.scheduler.ready():
            raise service_unavailable("the engine is not running")
        prompt = EnginePrompt.with_images(prompt_ids, processed)
        options = plan.text_options(TextOptions.of(body))
        timeout = RequestTimeout.of(body.timeout, state.config.request_timeout, arrived)
        deltas = generate_choices(
            state.scheduler,
            tokenizer,
            [prompt],
            sampling,
            body.n,
            options,
            plan.parser,
            timeout=timeout,
        )
        deltas = record.watch([prompt], body.n, deltas)
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        record.id = reply_id
        if body.stream:
            deltas = prepend(await first_delta(deltas), deltas)  # errors before it: a status
            resp.sse = self.stream(body, deltas, reply_id, created, len(prompt_ids))
        else:
            answer = await self.collect(body, deltas, reply_id, created, prompt_ids)
            resp.data = encoder.encode(answer)
            resp.content_type = falcon.MEDIA_JSON

    async def collect(
        self,
        body: ChatCompletionRequest,
        deltas: AsyncIterator[ChoiceDelta],
        reply_id: str,
        created: int,
        prompt_ids: list[int],
    ) -> ChatCompletion:
        joined, cached = await collect_choices(deltas, body.n)
        choices = [
            ChatChoice(
                index=i,
                message=assistant_message(c.output),
                logprobs=chat_logprobs(self.state, c.token_ids, c.logprobs)
                if body.logprobs
                else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(joined)
        ]
        completion = sum(len(c.token_ids) for c in joined)
        return ChatCompletion(
            id=reply_id,
            created=created,
            model=self.state.model_name,
            choices=choices,
            usage=make_usage(len(prompt_ids), completion, cached),
            prompt_logprobs=requested(
                self.state.token_texts, body.prompt_logprobs, prompt_ids, joined[0].prompt_logprobs
            ),
        )

    async def stream(
        self,
        body: ChatCompletionRequest,
        deltas: AsyncIterator[ChoiceDelta],
        reply_id: str,
        created: int,
        prompt_len: int,
    ) -> AsyncIterator[SSEvent]:
        def chunk(choices: list[ChatChunkChoice], usage=None) -> SSEvent:  # noqa: ANN001
            return sse(
                ChatCompletionChunk(
                    id=reply_id, created=created, model=self.state.model_name,
                    choices=choices, usage=usage,
                )
            )  # fmt: skip

        completion, cached = 0, 0
        try:
            for i in range(body.n):
                yield chunk(
                    [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]
                )
            async with aclosing(deltas) as events:
                async for d in events:
                    completion += len(d.token_ids)
                    cached = max(cached, d.num_cached_tokens)
                    if not d.output and d.finish_reason is None and not body.logprobs:
                        continue
                    lps = (
                        chat_logprobs(self.state, d.token_ids, d.logprobs or [])
                        if body.logprobs
                        else None
                    )
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=d.index,
                                delta=chat_delta(d.output),
                                logprobs=lps,
                                finish_reason=d.finish_reason,
                            )
                        ]
                    )
            if body.stream_options and body.stream_options.include_usage:
                yield chunk([], make_usage(prompt_len, completion, cached))
            yield SSEvent(data=b"[DONE]")
        except APIError as err:  # the stream has begun: report the error in it, then close
            yield SSEvent(data=err.to_json())
