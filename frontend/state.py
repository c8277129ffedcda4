"""What every route of one frontend process shares: config, scheduler connection, tokenizer."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import falcon.asgi
import httpx

from vlmserve.frontend.detokenizer import TokenTexts
from vlmserve.frontend.errors import APIError, model_not_found
from vlmserve.frontend.prompts import Prompter
from vlmserve.frontend.sampling_defaults import NO_DEFAULTS, SamplingDefaults
from vlmserve.frontend.scheduler_client import SchedulerClient
from vlmserve.shared.config import Config

T = TypeVar("T")


@dataclass
class FrontendState:
    config: Config
    prompter: Prompter
    scheduler: SchedulerClient
    token_texts: TokenTexts
    http: httpx.AsyncClient  # image fetches
    sampling_defaults: SamplingDefaults = NO_DEFAULTS
    vocab_size: int | None = None  # the model's logits width (may exceed the tokenizer's)
    created: int = int(time.time())

    @property
    def model_name(self) -> str:
        return self.config.served_name

    def check_model(self, model: str | None) -> None:
        """A request may name the served model (as /v1/models lists it), or none; any other
        name is a 404. The checkpoint directory's own name is taken too when the listed name
        ends with it (`./ckpt/llava` for `llava`): earlier versions listed that name, and
        clients written against them send it. A hub id's snapshot directory is no such name."""
        if model is None or model == self.model_name:
            return
        directory = os.path.basename(os.path.normpath(self.config.model))
        listed_tail = os.path.basename(os.path.normpath(self.model_name))
        if model == directory == listed_tail:
            return
        raise model_not_found(model)

    async def read_body(self, req: falcon.asgi.Request) -> bytes:
        """The request body, refused with a 413 past --max-body-mb (before reading it all)."""
        limit = self.config.max_body_mb * 2**20
        if req.content_length is not None and req.content_length > limit:
            raise _too_large(req.content_length, limit)
        body = await req.stream.read(limit + 1)
        if len(body) > limit:
            raise _too_large(len(body), limit)
        return body

    async def off_loop(self, fn: Callable[..., T], *args: object) -> T:
        """Run CPU-heavy work (tokenizing, templates) in a thread: the event loop stays free."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
