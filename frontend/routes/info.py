"""GET /v1/models, /health, /metrics, /openapi.json and the Swagger UI pages."""

from __future__ import annotations

import falcon.asgi
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST

from vlmserve.frontend.errors import service_unavailable
from vlmserve.frontend.metrics import FrontendMetrics
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
    """Prometheus text format: every frontend worker's request metrics, added up, and the
    engine's latest status (see frontend/metrics.py)."""

    def __init__(self, metrics: FrontendMetrics) -> None:
        self.metrics = metrics

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.data = self.metrics.exposition()
        resp.content_type = CONTENT_TYPE_LATEST
