"""The Falcon ASGI app of one frontend process: `create_app(config)`."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os

import falcon.asgi

from vlmserve.frontend.admission import Admission
from vlmserve.frontend.detokenizer import TokenTexts
from vlmserve.frontend.errors import invalid_api_key, register_error_handlers
from vlmserve.frontend.media_fetch import make_client
from vlmserve.frontend.metrics import FrontendMetrics
from vlmserve.frontend.openapi import STATIC_DIR
from vlmserve.frontend.prompts import Prompter
from vlmserve.frontend.request_log import RequestRecorder
from vlmserve.frontend.routes.chat import ChatCompletionsResource
from vlmserve.frontend.routes.completions import CompletionsResource
from vlmserve.frontend.routes.info import (
    DocsResource,
    HealthResource,
    MetricsResource,
    ModelsResource,
    OpenAPIResource,
)
from vlmserve.frontend.routes.tokens import DetokenizeResource, EncodeResource, TokenizeResource
from vlmserve.frontend.routes.ui import UIResource
from vlmserve.frontend.sampling_defaults import load_sampling_defaults
from vlmserve.frontend.scheduler_client import SchedulerClient
from vlmserve.frontend.state import FrontendState
from vlmserve.shared.config import Config
from vlmserve.shared.models import checkpoint_spec, read_model_info
from vlmserve.shared.models import session_len as model_session_len

log = logging.getLogger("vlmserve.frontend")

# Paths anyone may read without an API key.
PUBLIC_PATHS = ("/health", "/metrics", "/openapi.json", "/docs", "/static", "/ui")


class ApiKeyAuth:
    """Requires `Authorization: Bearer <key>` when --api-keys is set."""

    def __init__(self, keys: str) -> None:
        self.keys = [k.strip().encode() for k in keys.split(",") if k.strip()]

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if not self.keys or req.path == "/" or req.path.startswith(PUBLIC_PATHS):
            return
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        # compare_digest against every key: the time taken says nothing about which matched.
        matches = [hmac.compare_digest(given, key) for key in self.keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise invalid_api_key()


class SchedulerConnection:
    """Connects to the scheduler when the worker's event loop starts; closes on shutdown."""

    def __init__(self, state: FrontendState) -> None:
        self.state = state
        self.task: asyncio.Task | None = None

    async def process_startup(self, scope: dict, event: dict) -> None:
        config = self.state.config
        log.info(
            "frontend %s pid %d: model %s as %r, requests %s, tokens %s",
            self.state.scheduler.frontend_id, os.getpid(), config.model, config.served_name,
            config.address("requests"), config.address("tokens"),
        )  # fmt: skip
        # Keep trying in the background: a frontend may start before the scheduler does,
        # and answers 503 until it is connected.
        self.task = asyncio.create_task(self.state.scheduler.start(timeout=None))

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.state.scheduler.close()
        await self.state.http.aclose()


def model_vocab_size(model_dir: str) -> int | None:
    """The width of the model's logits: its config's vocab_size (the embedding's rows, which
    real checkpoints pad past the tokenizer's length)."""
    spec = checkpoint_spec(model_dir)
    raw = spec.raw_config(model_dir)
    size = spec.text_config(raw).get("vocab_size") or raw.get("vocab_size")
    return int(size) if size else None


def create_app(config: Config) -> Admission:
    """The Falcon app of one frontend process, inside its admission control (the ASGI app)."""
    info = read_model_info(config.model)
    session_len = model_session_len(config.session_len, info)
    prompter = Prompter(config.model, session_len)
    state = FrontendState(
        config=config,
        prompter=prompter,
        scheduler=SchedulerClient(config),
        token_texts=TokenTexts(prompter.tokenizer),
        http=make_client(),
        sampling_defaults=load_sampling_defaults(config.generation_config, config.model),
        vocab_size=model_vocab_size(config.model),
    )
    auth = ApiKeyAuth(config.api_keys)
    metrics = FrontendMetrics(config.served_name, session_len, state.scheduler)
    recorder = RequestRecorder(metrics, prompter.tokenizer, config.log_requests)
    app = falcon.asgi.App(middleware=[SchedulerConnection(state), recorder, auth])
    register_error_handlers(app)
    app.add_route("/v1/models", ModelsResource(state))
    app.add_route("/v1/chat/completions", ChatCompletionsResource(state))
    app.add_route("/v1/completions", CompletionsResource(state))
    app.add_route("/v1/encode", EncodeResource(state))
    app.add_route("/tokenize", TokenizeResource(state))
    app.add_route("/detokenize", DetokenizeResource(state))
    app.add_route("/health", HealthResource(state))
    app.add_route("/metrics", MetricsResource(metrics))
    app.add_route("/openapi.json", OpenAPIResource(state, secured=bool(auth.keys)))
    docs = DocsResource()
    app.add_route("/", docs)
    app.add_route("/docs", docs)
    app.add_route("/ui", UIResource())
    app.add_static_route("/static", str(STATIC_DIR))
    limit, drain = config.max_concurrent_requests, config.drain_timeout
    return Admission(app, limit, drain, cut=state.scheduler.fail_all)
