"""GET /ui: the web chat page. Its script and stylesheet are static files (/static/ui/)."""

from __future__ import annotations

import falcon.asgi

from vlmserve.frontend.openapi import STATIC_DIR

UI_PAGE = STATIC_DIR / "ui" / "index.html"

# Everything the page loads comes from this server; images are data: or blob: URLs.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class UIResource:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.data = UI_PAGE.read_bytes()
        resp.content_type = falcon.MEDIA_HTML
        resp.set_header("Content-Security-Policy", CSP)
        resp.cache_control = ["no-cache"]
