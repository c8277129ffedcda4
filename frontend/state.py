"""What every route of one frontend process shares: config, scheduler connection, tokenizer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import falcon.asgi
import httpx

from vlmserve.frontend.detokenizer import TokenTexts
from vlmserve.frontend.errors import APIError, model_not_found
from vlmserve.frontend.prompts import Prompter
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
    created: int = int(time.time())

    @property
    def model_name(self) -> str:
        return self.config.served_name

    def check_model(self, model: str | None) -> None:
        """A request may name the served model, or none; any other name is a 404."""
        if model is not None and model != self.model_name:
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
