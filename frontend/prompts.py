"""Chat templates and tokenization, done the way the model's Hugging Face processor does it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import jinja2
import msgspec
import numpy as np
import transformers
from PIL import Image

from vlmserve.frontend.errors import bad_request
from vlmserve.frontend.media_fetch import image_hash
from vlmserve.frontend.schemas import ChatMessage, ImagePart, ToolChatMessage, VideoPart
from vlmserve.frontend.video import Video
from vlmserve.shared.models import checkpoint_spec
from vlmserve.shared.models.processing import processor_chat_template, tokenize_rendered


@dataclass
class ProcessedImage:
    """An image of a prompt ready for the engine: placed, preprocessed and keyed by content
    (the key of the encoder and prefix caches)."""

    offset: int
    length: int
    hash: str
    arrays: dict[str, np.ndarray]


def sized_key(key: str, arrays: dict[str, np.ndarray]) -> str:
    """The cache key of an image or video resized by a request's own pixel bounds: its content
    key and the grid it was resized to, which together fix its pixels (the same content at
    two sizes never shares an encoder or prefix cache entry; two bounds that give one grid
    do)."""
    grid = arrays.get("image_grid_thw", arrays.get("video_grid_thw"))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{key}:sized:{np.asarray(grid).tolist()}".encode())
    return digest.hexdigest()


def template_turn(message: ChatMessage) -> dict[str, Any]:
    """One turn as chat templates take it: unset fields left out, image parts as
    `{"type": "image"}` (what Hugging Face processors' templates expect), a tool result's text
    parts as one string, and the arguments of earlier tool calls as objects (templates write
    them with `tojson`; vLLM passes them so too)."""
    turn = msgspec.to_builtins(message)
    if isinstance(message, ToolChatMessage) and isinstance(message.content, list):
        turn["content"] = "".join(part.text for part in message.content)
    elif isinstance(message.content, list):
        turn["content"] = [
            {"type": "image"} if isinstance(part, ImagePart)
            else {"type": "video"} if isinstance(part, VideoPart)
            else msgspec.to_builtins(part)
            for part in message.content
        ]  # fmt: skip
    for call in turn.get("tool_calls") or []:
        try:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        except json.JSONDecodeError:
            message = "a tool call's `arguments` must be a JSON object"
            raise bad_request(message, "messages") from None
    return {k: v for k, v in turn.items() if v is not None}


def drops_string_content(tokenizer: Any) -> bool:
    """Whether the chat template writes nothing of a turn whose content is a plain string but
    writes it as a text part (SmolVLM2's published template reads only content parts): such a
    template gets every string content as one text part, as vLLM does for templates in the
    OpenAI content format."""
    probe = "vlmserve-probe"
    turns = ([{"role": "user", "content": probe}],
             [{"role": "user", "content": [{"type": "text", "text": probe}]}])  # fmt: skip
    try:
        as_string, as_parts = (tokenizer.apply_chat_template(t, tokenize=False) for t in turns)
    except Exception:  # a template that cannot render a lone user turn: leave it as it is
        return False
    return probe not in as_string and probe in as_parts


def as_text_parts(turn: dict[str, Any]) -> dict[str, Any]:
    if isinstance(turn.get("content"), str):
        return turn | {"content": [{"type": "text", "text": turn["content"]}]}
    return turn


class Prompter:
    """The model's tokenizer and chat template, and the session length prompts must fit."""

    def __init__(self, model_dir: str, session_len: int) -> None:
        spec = checkpoint_spec(model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.session_len = session_len
        self.images = spec.image_processor(model_dir)  # None: text only
        if self.tokenizer.chat_template is None:
            template = processor_chat_template(model_dir) or spec.chat_template()
            self.tokenizer.chat_template = template
        self.parts_only = self.tokenizer.chat_template is not None and drops_string_content(
            self.tokenizer
        )

    def render_chat(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The conversation as the chat template writes it (with `tools`, when given, in the
        template's own tool section)."""
        dicts = [template_turn(message) for message in messages]
        if self.parts_only:
            dicts = [as_text_parts(turn) for turn in dicts]
        if self.tokenizer.chat_template is None:
            raise bad_request("this model has no chat template: use /v1/completions", "messages")
        try:
            return self.tokenizer.apply_chat_template(
                dicts, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
            )
        except jinja2.TemplateError as exc:  # e.g. roles that do not alternate
            raise bad_request(
                f"the model's chat template refused the messages: {exc}", "messages"
            ) from exc

    def render_chat_text(self, text: str) -> str:
        """A plain string as one user turn, rendered by the chat template."""
        turn = {"role": "user", "content": text}
        return self.tokenizer.apply_chat_template(
            [as_text_parts(turn) if self.parts_only else turn],
            tokenize=False,
            add_generation_prompt=True,
        )

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a rendered chat, as the model's processor would tokenize it."""
        return tokenize_rendered(self.tokenizer, text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def chat_inputs(
        self,
        messages: list[ChatMessage],
        images: list[Image.Image],
        tools: list[dict[str, Any]] | None = None,
        videos: list[Video] | None = None,
        pixels: Any = None,
    ) -> tuple[list[int], list[ProcessedImage]]:
        """The prompt's token ids (image and video placeholders expanded) and its processed
        images and videos, in prompt order (a video is one item, its frames in its arrays).
        `pixels`: the request's pixel bounds (a Qwen-VL PixelBounds; None: the checkpoint's)."""
        text = self.render_chat(messages, tools=tools)
        if not images and not videos:
            return self.encode_rendered(text), []
        try:
            if pixels is not None:
                ids, placed = self.images.process(text, images, videos or [], pixels=pixels)
            elif videos:
                ids, placed = self.images.process(text, images, videos)
            else:
                ids, placed = self.images.process(text, images)
        except ValueError as exc:  # placeholders and images that do not pair up
            message = f"could not place the images in the prompt: {exc}"
            raise bad_request(message, "messages") from exc
        except Exception as exc:  # the model's processor refused this request's images
            message = f"the model's image processor could not take the images: {exc}"
            raise bad_request(message, "messages") from exc
        # Placed in prompt order, images and videos interleaved: each takes its kind's next key.
        image_keys = iter([image_hash(img) for img in images])
        video_keys = iter([video.hash for video in videos or []])
        processed = []
        for p in placed:
            key = next(video_keys if "video_grid_thw" in p.arrays else image_keys)
            if pixels is not None:
                key = sized_key(key, p.arrays)
            processed.append(ProcessedImage(p.offset, p.length, key, p.arrays))
        return ids, processed

    def check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        """The max_tokens to use; 400 when the prompt (plus max_tokens) exceeds the session."""
        if prompt_len >= self.session_len:
            raise bad_request(
                f"the prompt has {prompt_len} tokens; this server's session length is "
                f"{self.session_len} (--session-len), which must also leave room for output",
                "messages",
                code="context_length_exceeded",
            )
        room = self.session_len - prompt_len
        if max_tokens is not None and max_tokens > room:
            raise bad_request(
                f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: "
                f"{prompt_len + max_tokens} exceeds the session length {self.session_len}",
                "max_tokens",
                code="context_length_exceeded",
            )
        return room
