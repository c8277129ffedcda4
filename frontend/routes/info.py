"""GET /v1/models, /health, /metrics, /openapi.json and the Swagger UI pages."""

from __future__ import annotations

import falcon.asgi
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from vlmserve.frontend.errors import service_unavailable
from vlmserve.frontend.openapi import DOCS_PAGE, openapi_spec
from vlmserve.frontend.schemas import ModelCard, ModelList
from vlmserve.frontend.state import FrontendState


class ModelsResource:
    def __init__(self, state: FrontendState) -> None:
        self.state = state

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        card = ModelCard(
            id=self.state.model_name,
            created=self.state.created,
            root=self.state.config.model,
            max_model_len=self.state.prompter.session_len,
        )
        resp.data = msgspec.json.encode(ModelList(data=[card]))
        resp.content_type = falcon.MEDIA_JSON


class HealthResource:
    """200 only while the scheduler publishes status and says every worker is alive."""

    def __init__(self, state: FrontendState) -> None:
        self.state = state

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if not await self.state.scheduler.ready():
            raise service_unavailable("the engine (scheduler or a worker) is not running")
        resp.status = falcon.HTTP_200
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = ""


class OpenAPIResource:
    def __init__(self, state: FrontendState, secured: bool) -> None:
        self.spec = msgspec.json.encode(openapi_spec(state.model_name, secured))

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.data = self.spec
        resp.content_type = falcon.MEDIA_JSON


class DocsResource:
    """Swagger UI, its assets served from this package (no CDN)."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.data = DOCS_PAGE.read_bytes()
        resp.content_type = falcon.MEDIA_HTML


class MetricsResource:
    """Prometheus text format: the engine's latest status, as this frontend last heard it."""

    def __init__(self, state: FrontendState) -> None:
        self.state = state
        self.registry = CollectorRegistry()
        gauge = lambda name, text: Gauge(f"vlmserve_{name}", text, registry=self.registry)  # noqa: E731
        self.gauges = {
            "workers_alive": gauge("engine_alive", "1 while the scheduler and workers run"),
            "num_running": gauge("num_requests_running", "sequences in the running batch"),
            "num_waiting": gauge("num_requests_waiting", "sequences waiting for KV blocks"),
            "free_blocks": gauge("kv_free_blocks", "free KV cache blocks"),
            "steps": gauge("engine_steps", "engine steps since start"),
            "preemptions": gauge("preemptions", "preemptions since start"),
        }

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        status = self.state.scheduler.status
        for field, gauge in self.gauges.items():
            if field == "workers_alive":
                gauge.set(1 if self.state.scheduler.alive else 0)
            else:
                gauge.set(getattr(status, field) if status is not None else 0)
        resp.data = generate_latest(self.registry)
        resp.content_type = CONTENT_TYPE_LATEST
