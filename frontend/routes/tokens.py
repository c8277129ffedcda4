"""Tokenizer endpoints: LMDeploy's POST /v1/encode, vLLM's POST /tokenize and /detokenize."""

from __future__ import annotations

import falcon.asgi
import msgspec

from vlmserve.frontend.errors import bad_request
from vlmserve.frontend.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    EncodeRequest,
    EncodeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from vlmserve.frontend.state import FrontendState
from vlmserve.frontend.validation import decode_request


def _json(resp: falcon.asgi.Response, body: msgspec.Struct) -> None:
    resp.data = msgspec.json.encode(body)
    resp.content_type = falcon.MEDIA_JSON


class EncodeResource:
    def __init__(self, state: FrontendState) -> None:
        self.state = state

    def _encode(self, text: str, body: EncodeRequest) -> list[int]:
        prompter = self.state.prompter
        if body.do_preprocess:
            return prompter.encode_rendered(prompter.render_chat_text(text))
        return prompter.encode(text, add_special_tokens=body.add_bos)

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = decode_request(await self.state.read_body(req), EncodeRequest)
        texts = [body.input] if isinstance(body.input, str) else body.input
        ids = [await self.state.off_loop(self._encode, t, body) for t in texts]
        if isinstance(body.input, str):
            _json(resp, EncodeResponse(input_ids=ids[0], length=len(ids[0])))
        else:
            _json(resp, EncodeResponse(input_ids=ids, length=[len(i) for i in ids]))


class TokenizeResource:
    def __init__(self, state: FrontendState) -> None:
        self.state = state

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = decode_request(await self.state.read_body(req), TokenizeRequest)
        self.state.check_model(body.model)
        prompter = self.state.prompter
        if body.messages is not None:
            text = prompter.render_chat(body.messages, body.add_generation_prompt)
            ids = await self.state.off_loop(prompter.encode_rendered, text)
        else:
            ids = await self.state.off_loop(prompter.encode, body.prompt, body.add_special_tokens)
        _json(
            resp, TokenizeResponse(count=len(ids), max_model_len=prompter.session_len, tokens=ids)
        )


class DetokenizeResource:
    def __init__(self, state: FrontendState) -> None:
        self.state = state

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = decode_request(await self.state.read_body(req), DetokenizeRequest)
        self.state.check_model(body.model)
        tokenizer = self.state.prompter.tokenizer
        if any(t >= len(tokenizer) for t in body.tokens):
            raise bad_request(f"token ids must be below {len(tokenizer)}", "tokens")
        _json(resp, DetokenizeResponse(prompt=tokenizer.decode(body.tokens)))
