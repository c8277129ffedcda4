"""A small Python client for this server, shaped like LMDeploy's `APIClient`.

    from vlmserve.client import APIClient

    client = APIClient("http://127.0.0.1:23333", api_key=None)
    model = client.available_models[0]
    for reply in client.chat_completions_v1(model, [{"role": "user", "content": "hi"}]):
        print(reply["choices"][0]["message"]["content"])
    for chunk in client.chat_completions_v1(model, "hi", stream=True, max_tokens=32):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")
    input_ids, length = client.encode("hello")

The generation methods are generators, as LMDeploy's are: they yield one OpenAI-shaped dict
when `stream` is false, or one per server-sent event when it is true. Keyword arguments go
into the request body as they are (`temperature`, `max_tokens`, `stop`, `top_k`, ...); what
is not given is left to the server's defaults. `AsyncAPIClient` has the same methods as
async generators (and awaitables for `available_models` and `encode`).

Failures raise `ServerError` (the server answered an error, before or during a stream: its
OpenAI error message, status and fields) or `ServerUnreachable` (no answer at all). Closing
a stream early (leaving the loop, `close()` on the generator) closes the connection, and the
server aborts the request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

__all__ = ["APIClient", "AsyncAPIClient", "APIClientError", "ServerError", "ServerUnreachable"]

# Generation can take minutes; the read timeout bounds the wait for each chunk (or the body).
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


class APIClientError(Exception):
    """Anything that kept a request from succeeding."""


class ServerUnreachable(APIClientError):
    """No HTTP answer: refused connection, unknown host, timeout, dropped connection."""


class ServerError(APIClientError):
    """The server answered with an error: an HTTP status >= 400, or an error event mid-stream
    (`status` None). `message`, `type`, `param` and `code` are OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        where = f"HTTP {status}" if status is not None else "error during the stream"
        super().__init__(f"{where}: {message}")
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code


def _error_from_body(body: Any, status: int | None, fallback: str) -> ServerError:
    """A ServerError from OpenAI's `{"error": {...}}` body, or from `fallback` text."""
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, str):  # some servers send {"error": "message"}
        detail = {"message": detail}
    if not isinstance(detail, dict):
        return ServerError(fallback.strip() or "no error message", status)
    return ServerError(
        str(detail.get("message") or fallback or "no error message"),
        status,
        detail.get("type"),
        detail.get("param"),
        detail.get("code"),
    )


def _http_error(status: int, content: bytes) -> ServerError:
    text = content.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    return _error_from_body(body, status, text[:500])


class _SSEReader:
    """Turns the lines of a text/event-stream into payloads: data lines joined until the blank
    line that ends an event. `[DONE]` ends the stream; an error payload raises."""

    def __init__(self) -> None:
        self.data: list[str] = []
        self.event = ""
        self.done = False

    def feed(self, line: str) -> dict | None:
        """One line (without its newline); the payload of the event it completes, if any."""
        if line == "":
            return self._dispatch()
        if line.startswith(":"):  # a comment (keep-alive)
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self.data.append(value)
        elif field == "event":
            self.event = value
        return None

    def finish(self) -> dict | None:
        """At the end of the body: the last event, if the server sent no blank line after it;
        an error if the stream ended without `[DONE]`."""
        payload = self._dispatch() if self.data else None
        if not self.done and payload is None:
            raise ServerError("the stream ended before [DONE]; the answer may be incomplete")
        return payload

    def _dispatch(self) -> dict | None:
        if not self.data:
            return None
        data, event = "\n".join(self.data), self.event
        self.data, self.event = [], ""
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            payload = json.loads(data)
        except ValueError:
            raise ServerError(
                f"the server sent an event that is not JSON: {data[:200]!r}"
            ) from None
        if event == "error" or (isinstance(payload, dict) and "error" in payload):
            raise _error_from_body(payload, None, data)
        return payload


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class _Base:
    def __init__(self, api_server_url: str, api_key: str | None) -> None:
        self.api_server_url = api_server_url.rstrip("/")
        self.api_key = api_key
        self.chat_completions_v1_url = f"{self.api_server_url}/v1/chat/completions"
        self.completions_v1_url = f"{self.api_server_url}/v1/completions"
        self.models_v1_url = f"{self.api_server_url}/v1/models"
        self.encode_v1_url = f"{self.api_server_url}/v1/encode"
        self.headers = _headers(api_key)


class APIClient(_Base):
    """Synchronous client. Use as a context manager, or call `close()`, to free connections."""

    def __init__(
        self,
        api_server_url: str,
        api_key: str | None = None,
        timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(api_server_url, api_key)
        self.http = httpx.Client(headers=self.headers, timeout=timeout)

    def __enter__(self) -> APIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    @property
    def available_models(self) -> list[str]:
        """The ids of the served models (GET /v1/models)."""
        return [m["id"] for m in self._request("GET", self.models_v1_url)["data"]]

    def encode(
        self, input: str | list[str], do_preprocess: bool = False, add_bos: bool = True
    ) -> tuple[list[int] | list[list[int]], int | list[int]]:
        """Token ids and their count (lists of each for a list of inputs), via /v1/encode.
        `do_preprocess` renders the input as a user turn with the chat template first."""
        body = {"input": input, "do_preprocess": do_preprocess, "add_bos": add_bos}
        out = self._request("POST", self.encode_v1_url, body)
        return out["input_ids"], out["length"]

    def chat_completions_v1(
        self, model: str, messages: str | list[dict[str, Any]], **params: Any
    ) -> Iterator[dict[str, Any]]:
        """POST /v1/chat/completions. A string is one user message, as in LMDeploy."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"model": model, "messages": messages, **params}
        yield from self._generate(self.chat_completions_v1_url, body)

    def completions_v1(
        self, model: str, prompt: str | list[Any], **params: Any
    ) -> Iterator[dict[str, Any]]:
        """POST /v1/completions: a prompt string, token ids, or a batch of either."""
        body = {"model": model, "prompt": prompt, **params}
        yield from self._generate(self.completions_v1_url, body)

    def _request(self, method: str, url: str, body: Any = None) -> Any:
        try:
            resp = self.http.request(method, url, json=body)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.api_server_url}: {exc}") from exc
        if resp.status_code >= 400:
            raise _http_error(resp.status_code, resp.content)
        return resp.json()

    def _generate(self, url: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if not body.get("stream"):
            yield self._request("POST", url, body)
            return
        try:
            with self.http.stream("POST", url, json=body) as resp:
                if resp.status_code >= 400:
                    raise _http_error(resp.status_code, resp.read())
                reader = _SSEReader()
                for line in resp.iter_lines():
                    payload = reader.feed(line)
                    if payload is not None:
                        yield payload
                    if reader.done:
                        return
                last = reader.finish()
                if last is not None:
                    yield last
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"connection to {self.api_server_url} failed: {exc}") from exc


class AsyncAPIClient(_Base):
    """The same methods for asyncio: `await client.available_models`,
    `await client.encode(...)`, `async for reply in client.chat_completions_v1(...)`."""

    def __init__(
        self,
        api_server_url: str,
        api_key: str | None = None,
        timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(api_server_url, api_key)
        self.http = httpx.AsyncClient(headers=self.headers, timeout=timeout)

    async def __aenter__(self) -> AsyncAPIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    @property
    async def available_models(self) -> list[str]:
        """The ids of the served models (GET /v1/models); await it."""
        return [m["id"] for m in (await self._request("GET", self.models_v1_url))["data"]]

    async def encode(
        self, input: str | list[str], do_preprocess: bool = False, add_bos: bool = True
    ) -> tuple[list[int] | list[list[int]], int | list[int]]:
        body = {"input": input, "do_preprocess": do_preprocess, "add_bos": add_bos}
        out = await self._request("POST", self.encode_v1_url, body)
        return out["input_ids"], out["length"]

    async def chat_completions_v1(
        self, model: str, messages: str | list[dict[str, Any]], **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"model": model, "messages": messages, **params}
        async for reply in self._generate(self.chat_completions_v1_url, body):
            yield reply

    async def completions_v1(
        self, model: str, prompt: str | list[Any], **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        body = {"model": model, "prompt": prompt, **params}
        async for reply in self._generate(self.completions_v1_url, body):
            yield reply

    async def _request(self, method: str, url: str, body: Any = None) -> Any:
        try:
            resp = await self.http.request(method, url, json=body)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.api_server_url}: {exc}") from exc
        if resp.status_code >= 400:
            raise _http_error(resp.status_code, resp.content)
        return resp.json()

    async def _generate(self, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if not body.get("stream"):
            yield await self._request("POST", url, body)
            return
        try:
            async with self.http.stream("POST", url, json=body) as resp:
                if resp.status_code >= 400:
                    raise _http_error(resp.status_code, await resp.aread())
                reader = _SSEReader()
                async for line in resp.aiter_lines():
                    payload = reader.feed(line)
                    if payload is not None:
                        yield payload
                    if reader.done:
                        return
                last = reader.finish()
                if last is not None:
                    yield last
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"connection to {self.api_server_url} failed: {exc}") from exc
