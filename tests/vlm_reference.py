"""Greedy references for vision-language checkpoints from Hugging Face transformers.

The prompt is made the way each model's processor makes it: LLaVA's AutoProcessor; for
Qwen2-VL the image processor plus the processor's placeholder expansion (its AutoProcessor
needs torchvision for video, which has no build for this torch), and `mm_token_type_ids`,
without which transformers 5's Qwen2-VL `generate` silently builds the wrong positions;
for InternVL its own InternVLProcessor, built without the video processor it cannot load here;
for Idefics3 and SmolVLM transformers' Idefics3Processor (`idefics3_processor`); for Mistral 3
transformers' PixtralProcessor (`pixtral_processor`); for Gemma 3 its Gemma3Processor.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
import types
from unittest import mock

import numpy as np
import openai
import torch
import transformers
from PIL import Image


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-style messages as processor chat templates take them ({"type": "image"})."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def user_turn(i: int, text: str) -> list[dict]:
    """One user turn showing image IMG<i> (see `with_image_urls`), then `text`."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"IMG{i}"}},
                                         {"type": "text", "text": text}]}]  # fmt: skip


def with_image_urls(
    messages: list[dict], images: list[Image.Image], base: str | None
) -> list[dict]:
    """`messages` with each image URL IMG<i> replaced by images[i] as a data URL, or by http
    from `base` (where it is served as <i>.png)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [dict(p) for p in content]
            for p in content:
                if p["type"] == "image_url":
                    i = int(p["image_url"]["url"][3:])
                    url = f"{base}/{i}.png" if base else data_url(images[i])
                    p["image_url"] = {"url": url}
        out.append({"role": m["role"], "content": content})
    return out


def with_images_in_order(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """`messages` with their image_url parts, in order, showing `images` as data URLs."""
    urls = iter(data_url(image) for image in images)
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": next(urls)}}
                if p["type"] == "image_url" else p
                for p in content
            ]  # fmt: skip
        out.append({"role": m["role"], "content": content})
    return out


def internvl_processor(model_dir: str) -> transformers.InternVLProcessor:
    """transformers' InternVLProcessor for a checkpoint (its image processor, tokenizer and
    image_seq_length). Loading it needs torchvision for the video processor, which has no build
    for our torch; images never touch that, so it is built with none."""
    with open(os.path.join(model_dir, "processor_config.json")) as f:
        seq_length = json.load(f)["image_seq_length"]
    with mock.patch.object(transformers.ProcessorMixin, "check_argument_for_proper_class"):
        return transformers.InternVLProcessor(
            image_processor=transformers.AutoImageProcessor.from_pretrained(model_dir),
            tokenizer=transformers.AutoTokenizer.from_pretrained(model_dir),
            video_processor=None,
            image_seq_length=seq_length,
        )


def idefics3_processor(model_dir: str) -> transformers.Idefics3Processor:
    """transformers' Idefics3Processor over the checkpoint's image processor and tokenizer; for
    SmolVLM too, whose own processor needs torchvision and num2words (for video) and writes
    the same image text."""
    with open(f"{model_dir}/processor_config.json") as f:
        seq_len = json.load(f)["image_seq_len"]
    return transformers.Idefics3Processor(
        transformers.AutoImageProcessor.from_pretrained(model_dir),
        transformers.AutoTokenizer.from_pretrained(model_dir),
        image_seq_len=seq_len,
    )


def pixtral_processor(model_dir: str) -> object:
    """transformers' PixtralProcessor for a checkpoint (its image processor, tokenizer and
    processor_config.json). Its module imports one helper (for counting tokens ahead, which
    processing images never calls) from the torchvision image processor, which has no build for
    our torch; the PIL image processor's same-named helper stands in for that import."""
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    name = "transformers.models.pixtral.image_processing_pixtral"
    stand_in = types.ModuleType(name)
    stand_in.get_resize_output_image_size = pil.get_resize_output_image_size
    with mock.patch.dict(sys.modules, {name: stand_in}):
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    with open(os.path.join(model_dir, "processor_config.json")) as f:
        published = json.load(f)
    kwargs = {k: published[k] for k in ("patch_size", "spatial_merge_size") if k in published}
    return PixtralProcessor(
        transformers.AutoImageProcessor.from_pretrained(model_dir),
        transformers.AutoTokenizer.from_pretrained(model_dir),
        **kwargs,
    )


class VLMReference:
    def __init__(self, model_dir: str, chat_template: str | None = None) -> None:
        self.model_dir = model_dir
        self.config = transformers.AutoConfig.from_pretrained(model_dir)
        self.arch = self.config.architectures[0]
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        elif self.tokenizer.chat_template is None:  # the processor's (SmolVLM2's), if any
            path = os.path.join(model_dir, "chat_template.json")
            if os.path.exists(path):
                with open(path) as f:
                    self.tokenizer.chat_template = json.load(f)["chat_template"]
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=torch.float32
        ).eval()

    def inputs(self, messages: list[dict], images: list[Image.Image]) -> dict:
        text = self.tokenizer.apply_chat_template(
            template_messages(messages), tokenize=False, add_generation_prompt=True
        )
        if self.arch == "InternVLForConditionalGeneration":
            processor = internvl_processor(self.model_dir)
            return dict(processor(text=[text], images=images or None, return_tensors="pt"))
        if self.arch in ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"):
            # Every content as parts, as these processors' model cards write chats (SmolVLM2's
            # published template writes nothing of a plain-string content).
            parts = [
                m | {"content": [{"type": "text", "text": m["content"]}]}
                if isinstance(m["content"], str) else m
                for m in template_messages(messages)
            ]  # fmt: skip
            text = self.tokenizer.apply_chat_template(
                parts, tokenize=False, add_generation_prompt=True
            )
            processor = idefics3_processor(self.model_dir)
            return dict(processor(text=[text], images=images or None, return_tensors="pt"))
        if self.arch == "Gemma3ForConditionalGeneration":
            # Gemma3Processor as it is (it returns the token_type_ids that open each image's
            # mask both ways); Gemma's template writes the BOS, so none is added to it.
            processor = transformers.AutoProcessor.from_pretrained(self.model_dir)
            add = not text.startswith(processor.tokenizer.bos_token)
            return dict(
                processor(
                    text=[text], images=images or None, return_tensors="pt", add_special_tokens=add
                )
            )
        if self.arch == "Mistral3ForConditionalGeneration":
            processor = pixtral_processor(self.model_dir)
            # The template writes the BOS itself, as Mistral's does: the processor must not add
            # a second (the tokenizer's own only when the text lacks it).
            bos = processor.tokenizer.bos_token
            add = not (bos and text.startswith(bos))
            return dict(
                processor(
                    text=[text], images=images or None, return_tensors="pt", add_special_tokens=add
                )
            )
        if "Qwen" not in self.arch:
            processor = transformers.AutoProcessor.from_pretrained(self.model_dir)
            return dict(processor(text=[text], images=images or None, return_tensors="pt"))
        extra = {}
        if images:
            ip = transformers.AutoImageProcessor.from_pretrained(self.model_dir)
            extra = dict(ip(images=images, return_tensors="pt"))
            pad = "<|image_pad|>"
            parts = text.split(pad)
            counts = [int(np.prod(g.tolist())) // ip.merge_size**2 for g in extra["image_grid_thw"]]
            text = parts[0] + "".join(pad * n + p for n, p in zip(counts, parts[1:], strict=True))
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        mm = (ids == self.config.image_token_id).int()
        return dict(
            input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, **extra
        )

    def greedy(
        self, messages: list[dict], images: list[Image.Image], max_new: int
    ) -> tuple[int, list[int]]:
        """(prompt tokens, generated tokens) of greedy `generate`."""
        inputs = self.inputs(messages, images)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        n = inputs["input_ids"].shape[1]
        return n, out[0, n:].tolist()

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def assert_served_like_transformers(
    rounds: dict[str, list | dict],
    expected: list[tuple[int, list[int]]],
    texts: list[str],
    image_counts: list[int],
) -> None:
    """Every reply of every round (a list of replies in chat order, or {chat index: reply})
    against transformers' greedy `generate` of its chat: exact usage.prompt_tokens, the same
    text and as many completion tokens. A mismatch names the round, the chat and the
    reference's tokens."""
    for label, replies in rounds.items():
        if isinstance(replies, list):
            assert len(replies) == len(expected), f"{label} round: {len(replies)} replies"
            replies = dict(enumerate(replies))
        for i, reply in replies.items():
            prompt_len, tokens = expected[i]
            what = f"{label} round, chat {i} ({image_counts[i]} images)"
            assert reply.usage.prompt_tokens == prompt_len, f"{what}: prompt tokens"
            assert reply.choices[0].message.content == texts[i], (
                f"{what}: differs from transformers' greedy tokens {tokens}"
            )
            assert reply.usage.completion_tokens == len(tokens), what


def greedy_chats(url: str, conversations: list[list[dict]], max_tokens: int) -> list:
    """The server's greedy answers (openai ChatCompletion objects) to every conversation,
    all sent at once so they share the engine's batches."""

    async def ask_all() -> list:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        try:
            jobs = [
                client.chat.completions.create(
                    model="ckpt", messages=messages, max_tokens=max_tokens, temperature=0
                )
                for messages in conversations
            ]
            return await asyncio.gather(*jobs)
        finally:
            await client.close()

    return asyncio.run(ask_all())
