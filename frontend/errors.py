"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can see goes through here, so the openai SDK raises the right
exception class (it picks it by status) and shows our message. Routes raise `APIError`;
`register_error_handlers` turns that, Falcon's own HTTP errors and anything unexpected
into a JSON body of this shape.
"""

from __future__ import annotations

import logging
import re

import falcon
import falcon.asgi
import msgspec

log = logging.getLogger("vlmserve.frontend.errors")


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail


# The `type` OpenAI gives each status. 401 is an invalid_request_error with
# code "invalid_api_key", 404 for a model adds code "model_not_found", as OpenAI does.
DEFAULT_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or DEFAULT_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorDetail(self.message, self.type, self.param, self.code))

    def to_json(self) -> bytes:
        """The encoded body; also what a stream sends as `data: ...` when it fails midway."""
        return msgspec.json.encode(self.body())

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r})"


# ---- the errors routes raise most ------------------------------------------------------------


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def invalid_api_key() -> APIError:
    return APIError(
        401,
        "Incorrect API key provided. Send it as `Authorization: Bearer <key>`.",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist. See GET /v1/models for the served model.",
        param="model",
        code="model_not_found",
    )


def service_unavailable(message: str, retry_after_s: int = 1) -> APIError:
    """503: the engine is gone or not ready; clients may retry after `retry_after_s`."""
    return APIError(
        503,
        message,
        code="service_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def request_timeout(timeout_s: float) -> APIError:
    """408: the request ran past its `timeout` (or --request-timeout); nothing more comes."""
    return APIError(
        408,
        f"The request did not finish within its timeout of {timeout_s:g} s.",
        type="timeout_error",
        code="request_timeout",
    )


# ---- msgspec errors as 400s ------------------------------------------------------------------

# msgspec appends where it failed: "Expected `float` >= 0.0 - at `$.temperature`".
_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
# A missing field is named in the message, not the path: "Object missing required field `x`".
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def _param_from_path(path: str) -> str | None:
    """`.messages[0].content` -> `messages[0].content`; `.logit_bias[...]` -> `logit_bias`."""
    path = path.replace("[...]", "").lstrip(".")
    return path or None


def from_msgspec_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> APIError:
    """A 400 that names the offending field as `param` and in the message."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return bad_request(f"The request body is not valid JSON: {text}")
    match = _AT_PATH.search(text)
    path = match.group("path") if match else ""
    detail = text[: match.start()] if match else text
    missing = _MISSING.match(detail)
    if missing:
        path = f"{path}.{missing.group('field')}"
    param = _param_from_path(path)
    if param is None:
        return bad_request(f"Invalid request body: {detail}")
    if missing:
        return bad_request(f"Missing required parameter: `{param}`.", param=param)
    return bad_request(f"Invalid value for `{param}`: {detail}", param=param)


# ---- Falcon handlers -------------------------------------------------------------------------


def _answer(resp: falcon.asgi.Response, err: APIError) -> None:
    resp.status = err.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = err.to_json()
    for name, value in err.headers.items():
        resp.set_header(name, value)


def from_http_error(req: falcon.asgi.Request, ex: falcon.HTTPError) -> APIError:
    """Falcon's own errors (unknown route, wrong method, body too large) in OpenAI's shape."""
    status = ex.status_code
    if isinstance(ex, falcon.HTTPRouteNotFound):
        # OpenAI's wording for an unknown path.
        message = f"Invalid URL ({req.method} {req.path})"
    elif isinstance(ex, falcon.HTTPMethodNotAllowed):
        message = f"Method {req.method} is not allowed for {req.path}"
    else:
        message = ex.title if not ex.description else f"{ex.title}: {ex.description}"
    headers = dict(ex.headers or {})
    return APIError(status, message, headers=headers)


async def _handle_api_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: APIError, params: dict
) -> None:
    _answer(resp, ex)


async def _handle_msgspec_error(
    req: falcon.asgi.Request,
    resp: falcon.asgi.Response,
    ex: msgspec.ValidationError | msgspec.DecodeError,
    params: dict,
) -> None:
    _answer(resp, from_msgspec_error(ex))


async def _handle_http_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: falcon.HTTPError, params: dict
) -> None:
    _answer(resp, from_http_error(req, ex))


async def _handle_unexpected(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: Exception, params: dict
) -> None:
    # A bug, not the client's fault: log the traceback, tell the client nothing internal.
    log.exception("unhandled error in %s %s", req.method, req.path)
    _answer(resp, APIError(500, "The server had an error while processing your request."))


def register_error_handlers(app: falcon.asgi.App) -> None:
    """Answer every error in OpenAI's shape. Falcon picks the most specific handler by MRO."""
    app.add_error_handler(Exception, _handle_unexpected)
    app.add_error_handler(falcon.HTTPError, _handle_http_error)
    # ValidationError is a DecodeError, so this covers bad JSON and bad fields.
    app.add_error_handler(msgspec.DecodeError, _handle_msgspec_error)
    app.add_error_handler(APIError, _handle_api_error)
