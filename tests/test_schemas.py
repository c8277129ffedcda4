"""Request decoding, OpenAI-shaped responses and errors, and the request -> SamplingParams map."""

from __future__ import annotations

import falcon
import falcon.asgi
import falcon.testing
import msgspec
import pytest

from vlmserve.frontend import schemas as s
from vlmserve.frontend.errors import APIError, model_not_found, register_error_handlers
from vlmserve.frontend.sampling_defaults import SamplingDefaults
from vlmserve.frontend.sampling_params import bad_words_token_ids, stop_strings, to_sampling_params
from vlmserve.frontend.validation import completion_prompts, decode_request
from vlmserve.shared.messages import SamplingParams


class WordTokenizer:
    """One token per character, except that a character after a space is another token (as a
    word after a space is in sentencepiece vocabularies); or, with `space_token`, the space is
    a token of its own."""

    def __init__(self, space_token: bool = False) -> None:
        self.space_token = space_token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens, "bad words are tokenized without a BOS"
        if self.space_token:
            return [ord(c) for c in text]
        return [
            ord(c) + 1000 * (i > 0 and text[i - 1] == " ") for i, c in enumerate(text) if c != " "
        ]


TOKENIZER = WordTokenizer()


def chat_body(**fields) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | fields
    return msgspec.json.encode(body)


def decode_error(body: bytes, kind: type) -> APIError:
    with pytest.raises(APIError) as info:
        decode_request(body, kind)
    assert info.value.status == 400
    return info.value


# ---- requests --------------------------------------------------------------------------------


def test_chat_request_with_text_and_image_parts() -> None:
    body = chat_body(
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                    {"type": "image_url", "image_url": "https://example.com/cat.png"},
                ],
            },
            {"role": "assistant", "content": None},
        ],
        stream=True,
        stream_options={"include_usage": True},
        stop=["\n\n"],
    )
    req = decode_request(body, s.ChatCompletionRequest)
    parts = req.messages[1].content
    assert isinstance(parts, list)
    assert parts[0] == s.TextPart(text="what is this?")
    assert parts[1] == s.ImagePart(image_url=s.ImageURL(url="data:image/png;base64,AA"))
    assert parts[2] == s.ImagePart(image_url="https://example.com/cat.png")
    assert req.stream and req.stream_options == s.StreamOptions(include_usage=True)
    assert stop_strings(req) == ["\n\n"]


def test_unknown_fields_are_ignored() -> None:
    req = decode_request(
        chat_body(session_id=7, tools=[], messages=[{"role": "user", "content": "x", "foo": 1}]),
        s.ChatCompletionRequest,
    )
    assert req.messages[0].content == "x"


def test_null_optional_fields_are_accepted() -> None:
    req = decode_request(
        chat_body(temperature=None, top_p=None, stop=None, logit_bias=None, max_tokens=None),
        s.ChatCompletionRequest,
    )
    assert req.temperature is None and req.stop is None


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"temperature": -0.1}, "temperature", ">= 0.0"),
        ({"temperature": 2.5}, "temperature", "<= 2.0"),
        ({"top_p": 0}, "top_p", "> 0.0"),
        ({"n": 0}, "n", ">= 1"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "<= 20"),
        ({"presence_penalty": 3}, "presence_penalty", "<= 2.0"),
        ({"frequency_penalty": "x"}, "frequency_penalty", "got `str`"),
        ({"stop": 5}, "stop", "Expected"),
        ({"logit_bias": {"12": 101}}, "logit_bias", "<= 100.0"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"top_logprobs": 3}, "top_logprobs", "requires `logprobs`"),
        ({"top_k": -5}, "top_k", "top_k"),
        ({"messages": []}, "messages", ">= 1"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "'function'"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "Missing"),
        (
            {"messages": [{"role": "tool", "tool_call_id": "1", "content": [{"text": "x"}]}]},
            "messages[0].content[0].type",
            "Missing",
        ),
        (
            {
                "messages": [
                    {
                        "role": "tool",
                        "tool_call_id": "1",
                        "content": [{"type": "image_url", "image_url": "https://a/b.png"}],
                    }
                ]
            },
            "messages[0]",
            "text only",
        ),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "Missing required"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "Missing required"),
        ({"messages": [{"role": "system", "content": None}]}, "messages[0].content", "null"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0].type",
            "audio",
        ),
    ],
)
def test_invalid_chat_fields_name_the_param(fields: dict, param: str, words: str) -> None:
    err = decode_error(chat_body(**fields), s.ChatCompletionRequest)
    assert err.param == param
    assert words in err.message
    assert f"`{param}`" in err.message or param in err.message


def test_missing_top_level_field_and_bad_json() -> None:
    err = decode_error(b'{"model": "m"}', s.ChatCompletionRequest)
    assert err.param == "messages"
    assert err.message == "Missing required parameter: `messages`."
    err = decode_error(b'{"model": ', s.ChatCompletionRequest)
    assert err.param is None and "not valid JSON" in err.message
    err = decode_error(b"[1]", s.ChatCompletionRequest)
    assert err.param is None and "object" in err.message


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt: object, expected: list) -> None:
    req = decode_request(msgspec.json.encode({"prompt": prompt}), s.CompletionRequest)
    assert completion_prompts(req) == expected


@pytest.mark.parametrize("prompt", [[], ["a", 1], [[1], "a"], [[1], []]])
def test_completion_prompt_bad_forms(prompt: object) -> None:
    err = decode_error(msgspec.json.encode({"prompt": prompt}), s.CompletionRequest)
    assert err.param == "prompt"


def test_completion_logprobs_range() -> None:
    err = decode_error(b'{"prompt": "x", "logprobs": 21}', s.CompletionRequest)
    assert err.param == "logprobs"


def test_tokenize_request_needs_prompt_or_messages() -> None:
    assert decode_request(b'{"prompt": "x"}', s.TokenizeRequest).prompt == "x"
    req = decode_request(b'{"messages": [{"role": "user", "content": "x"}]}', s.TokenizeRequest)
    assert req.messages is not None
    decode_error(b"{}", s.TokenizeRequest)
    decode_error(b'{"prompt": "x", "messages": []}', s.TokenizeRequest)


def test_encode_and_detokenize_requests() -> None:
    req = decode_request(b'{"input": ["a", "b"]}', s.EncodeRequest)
    assert req.input == ["a", "b"] and req.add_bos and not req.do_preprocess
    assert decode_request(b'{"tokens": [1, 2]}', s.DetokenizeRequest).tokens == [1, 2]
    assert decode_error(b'{"tokens": [-1]}', s.DetokenizeRequest).param == "tokens[0]"


# ---- to_sampling_params ----------------------------------------------------------------------


def test_sampling_defaults() -> None:
    req = decode_request(chat_body(), s.ChatCompletionRequest)
    assert to_sampling_params(req, 321, TOKENIZER) == SamplingParams(max_tokens=321)


def test_chat_sampling_mapping() -> None:
    req = decode_request(
        chat_body(
            max_tokens=10,
            max_completion_tokens=20,
            temperature=0,
            top_p=0.5,
            top_k=-1,
            min_p=0.1,
            repetition_penalty=1.1,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            seed=7,
            logprobs=True,
            top_logprobs=3,
            min_new_tokens=2,
            min_tokens=4,
            ignore_eos=True,
            stop_token_ids=[9],
            logit_bias={"5": -100},
            bad_words=["ab"],
        ),
        s.ChatCompletionRequest,
    )
    assert to_sampling_params(req, 100, TOKENIZER) == SamplingParams(
        max_tokens=20,  # max_completion_tokens wins
        temperature=0.0,
        top_p=0.5,
        top_k=0,
        min_p=0.1,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=7,
        logprobs=3,
        min_tokens=4,  # min_tokens wins over min_new_tokens
        ignore_eos=True,
        stop_token_ids=[9],
        logit_bias={5: -100.0},
        bad_words_token_ids=[[97, 98], [1097, 98]],
    )


def test_chat_logprobs_without_top_is_zero_alternatives() -> None:
    req = decode_request(chat_body(logprobs=True), s.ChatCompletionRequest)
    assert to_sampling_params(req, 16, TOKENIZER).logprobs == 0
    req = decode_request(chat_body(logprobs=False), s.ChatCompletionRequest)
    assert to_sampling_params(req, 16, TOKENIZER).logprobs is None


def test_completion_sampling_mapping() -> None:
    body = b'{"prompt": "x", "max_tokens": 5, "logprobs": 2, "min_new_tokens": 1, "top_k": 40}'
    params = to_sampling_params(decode_request(body, s.CompletionRequest), 100, TOKENIZER)
    assert (params.max_tokens, params.logprobs, params.min_tokens, params.top_k) == (5, 2, 1, 40)


def test_bad_words_are_tokenized_alone_and_after_a_space_as_vllm_does() -> None:
    # After a space the word starts with another token in as many tokens: both are banned.
    assert bad_words_token_ids(["ab", "  c d", " ", ""], TOKENIZER) == [
        [97, 98], [1097, 98], [99, 1100], [1099, 1100],
    ]  # fmt: skip
    # A space that is a token of its own adds a token: only the word itself is banned.
    assert bad_words_token_ids(["ab"], WordTokenizer(space_token=True)) == [[97, 98]]
    body = b'{"prompt": "x", "bad_words": ["q"]}'
    params = to_sampling_params(decode_request(body, s.CompletionRequest), 5, TOKENIZER)
    assert params.bad_words_token_ids == [[113], [1113]]
    assert decode_error(b'{"prompt": "x", "bad_words": "q"}', s.CompletionRequest).param == (
        "bad_words"
    )


def test_min_tokens_over_max_tokens_is_400() -> None:
    req = decode_request(chat_body(max_tokens=3, min_tokens=4), s.ChatCompletionRequest)
    with pytest.raises(APIError) as info:
        to_sampling_params(req, 100, TOKENIZER)
    assert info.value.param == "min_tokens"


# ---- responses -------------------------------------------------------------------------------


def test_chat_completion_shape() -> None:
    body = s.ChatCompletion(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[
            s.ChatChoice(index=0, message=s.AssistantMessage(content="hi"), finish_reason="stop")
        ],
        usage=s.make_usage(3, 1, cached_tokens=2),
    )
    assert msgspec.json.decode(msgspec.json.encode(body)) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "total_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }


def test_chat_chunk_shape() -> None:
    chunk = s.ChatCompletionChunk(
        id="c",
        created=1,
        model="m",
        choices=[s.ChatChunkChoice(index=0, delta=s.ChatDelta(content="x"))],
    )
    assert msgspec.json.decode(msgspec.json.encode(chunk)) == {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}
        ],
        "usage": None,
    }
    assert msgspec.json.encode(s.make_usage(1, 2)) == (
        b'{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}'
    )


def test_responses_parse_with_openai_types() -> None:
    """The openai SDK's own models accept what we send."""
    from openai.types import Completion as OpenAICompletion
    from openai.types.chat import ChatCompletion as OpenAIChat
    from openai.types.chat import ChatCompletionChunk as OpenAIChunk

    top = s.TopLogprob(token="a", logprob=-0.1, bytes=[97])
    chat_logprobs = s.ChatLogprobs(
        content=[s.ChatTokenLogprob(token="a", logprob=-0.1, bytes=[97], top_logprobs=[top])]
    )
    chat = s.ChatCompletion(
        id="x",
        created=1,
        model="m",
        choices=[
            s.ChatChoice(
                index=0,
                message=s.AssistantMessage(content="a"),
                logprobs=chat_logprobs,
                finish_reason="length",
            )
        ],
        usage=s.make_usage(1, 1),
    )
    parsed = OpenAIChat.model_validate_json(msgspec.json.encode(chat))
    assert parsed.choices[0].logprobs.content[0].top_logprobs[0].token == "a"

    chunk = s.ChatCompletionChunk(
        id="x",
        created=1,
        model="m",
        choices=[s.ChatChunkChoice(index=0, delta=s.ChatDelta(role="assistant", content=""))],
    )
    assert OpenAIChunk.model_validate_json(msgspec.json.encode(chunk)).choices[0].delta.role

    completion = s.Completion(
        id="x",
        created=1,
        model="m",
        choices=[
            s.CompletionChoice(
                text="ab",
                index=0,
                logprobs=s.CompletionLogprobs(
                    tokens=["a", "b"],
                    token_logprobs=[-0.1, -0.5],
                    top_logprobs=[{"a": -0.1}, {"b": -0.5}],
                    text_offset=[0, 1],
                ),
                finish_reason="stop",
            )
        ],
        usage=s.make_usage(1, 1),
    )
    parsed_completion = OpenAICompletion.model_validate_json(msgspec.json.encode(completion))
    assert parsed_completion.choices[0].logprobs.token_logprobs == [-0.1, -0.5]


def test_model_list_shape() -> None:
    models = s.ModelList(data=[s.ModelCard(id="m", created=5, root="/ckpt", max_model_len=4096)])
    assert msgspec.json.decode(msgspec.json.encode(models)) == {
        "object": "list",
        "data": [
            {
                "id": "m",
                "object": "model",
                "created": 5,
                "owned_by": "vlmserve",
                "root": "/ckpt",
                "max_model_len": 4096,
            }
        ],
    }


# ---- errors through Falcon -------------------------------------------------------------------


class _Chat:
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await req.stream.read()
        chat = decode_request(body, s.ChatCompletionRequest)
        if chat.model != "m":
            raise model_not_found(chat.model or "")
        if chat.user == "boom":
            raise RuntimeError("internal detail")
        if chat.user == "big":
            raise falcon.HTTPContentTooLarge(description="body over 1 MiB")
        resp.media = {"ok": True}


@pytest.fixture
def client() -> falcon.testing.TestClient:
    app = falcon.asgi.App()
    app.add_route("/v1/chat/completions", _Chat())
    register_error_handlers(app)
    return falcon.testing.TestClient(app)


def test_error_handlers_answer_in_openai_shape(client: falcon.testing.TestClient) -> None:
    path = "/v1/chat/completions"
    res = client.simulate_post(path, body=chat_body(temperature=9))
    assert res.status_code == 400
    assert res.json == {
        "error": {
            "message": "Invalid value for `temperature`: Expected `float` <= 2.0",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }
    res = client.simulate_post(path, body=chat_body(model="other"))
    assert res.status_code == 404 and res.json["error"]["code"] == "model_not_found"

    res = client.simulate_post("/v1/nothing", body=b"{}")
    assert res.status_code == 404
    assert res.json["error"]["message"] == "Invalid URL (POST /v1/nothing)"

    res = client.simulate_get(path)
    assert res.status_code == 405 and "POST" in res.headers["allow"]
    assert res.json["error"]["type"] == "invalid_request_error"

    res = client.simulate_post(path, body=chat_body(user="big"))
    assert res.status_code == 413 and "1 MiB" in res.json["error"]["message"]

    res = client.simulate_post(path, body=chat_body(user="boom"))
    assert res.status_code == 500
    assert res.json["error"]["type"] == "server_error"
    assert "internal detail" not in res.text


def test_checkpoint_defaults_fill_what_the_request_leaves_unset() -> None:
    # Qwen2.5-7B-Instruct's generation_config.json, plus a max_new_tokens.
    defaults = SamplingDefaults(
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, min_p=0.05, max_tokens=50
    )
    bare = decode_request(chat_body(), s.ChatCompletionRequest)
    params = to_sampling_params(bare, 321, TOKENIZER, defaults)
    assert params == SamplingParams(
        max_tokens=50, temperature=0.7, top_p=0.8, top_k=20, min_p=0.05, repetition_penalty=1.05
    )
    # The session's room caps the checkpoint's max_new_tokens.
    assert to_sampling_params(bare, 30, TOKENIZER, defaults).max_tokens == 30
    # A request's own fields win, even where they mean "off" (top_k -1 or 0, min_p 0).
    own = decode_request(
        chat_body(temperature=0, top_p=1, top_k=-1, min_p=0, repetition_penalty=1, max_tokens=99),
        s.ChatCompletionRequest,
    )
    neutral = SamplingParams(max_tokens=99, temperature=0.0)
    assert to_sampling_params(own, 321, TOKENIZER, defaults) == neutral
    body = b'{"prompt": "x", "top_k": 0, "temperature": 1.5}'
    params = to_sampling_params(decode_request(body, s.CompletionRequest), 100, TOKENIZER, defaults)
    assert (params.top_k, params.temperature, params.top_p) == (0, 1.5, 0.8)


def test_logit_bias_keys_must_be_ids_the_model_scores() -> None:
    req = decode_request(chat_body(logit_bias={"151999": 5, "0": 1}), s.ChatCompletionRequest)
    # Ids past the tokenizer but inside the model's (padded) vocabulary are fine.
    params = to_sampling_params(req, 10, TOKENIZER, vocab_size=152064)
    assert params.logit_bias == {151999: 5.0, 0: 1.0}
    for key in ("152064", "9" * 30):
        req = decode_request(chat_body(logit_bias={key: 1}), s.ChatCompletionRequest)
        with pytest.raises(APIError) as info:
            to_sampling_params(req, 10, TOKENIZER, vocab_size=152064)
        assert info.value.status == 400 and info.value.param == "logit_bias"
        assert "152064" in info.value.message


def test_whole_numbers_written_as_floats_are_integers() -> None:
    # JSON Schema's `integer` (what /openapi.json says) includes 2.0; OpenAI's servers take it.
    req = decode_request(
        chat_body(n=2.0, max_tokens=1e2, seed=-3.0, temperature=1), s.ChatCompletionRequest
    )
    assert (req.n, req.max_tokens, req.seed, req.temperature) == (2, 100, -3, 1.0)
    assert type(req.n) is int and type(req.temperature) is float
    assert decode_error(chat_body(n=2.5), s.ChatCompletionRequest).param == "n"
    assert decode_error(chat_body(n=True), s.ChatCompletionRequest).param == "n"
    req = decode_request(b'{"prompt": [1.0, 2]}', s.CompletionRequest)
    assert completion_prompts(req) == [[1, 2]]
