"""Vision-language models through the real server and the real `openai` client.

For each architecture, 8 requests in flight at once (one image, two images, text only,
images by data URL and by http URL from a local server) must give transformers' greedy
answer for the same processor and chat template, with exact `usage.prompt_tokens` (image
tokens counted as the HF processor counts them). A second round sends the same images
again, now served from the workers' encoder cache and the prefix cache: same answers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from server_fixtures import file_server, free_port
from vlm_reference import VLMReference, data_url, greedy_chats

from vlmserve.deploy.launcher import server
from vlmserve.shared.config import Config, new_run_id
from vlmserve.shared.models.llava_original import VICUNA_V1_TEMPLATE
from vlmserve.workers.demo_internvl import build_internvl
from vlmserve.workers.demo_qwen3_vl import build_qwen3_vl
from vlmserve.workers.demo_vlm import build_llava, build_llava_original, build_qwen2_vl

MAX_NEW = 12


def make_images() -> list[Image.Image]:
    """The same three images on every call (seeded noise, a flat colour, a gradient)."""
    noise = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    return [
        Image.fromarray(noise),
        Image.new("RGB", (30, 70), (10, 200, 30)),
        Image.linear_gradient("L").resize((64, 64)).convert("RGB"),
    ]


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory):
    """Serves the test images over http on 127.0.0.1 (allowed by --allowed-media-domains)."""
    root = tmp_path_factory.mktemp("images")
    for i, img in enumerate(make_images()):
        img.save(root / f"{i}.png")
    with file_server(str(root)) as url:
        yield url


BUILDERS = {
    "llava": lambda d: build_llava(d),
    "llava_next": lambda d: build_llava(d, next_=True),
    "qwen2_vl": lambda d: build_qwen2_vl(d),
    "qwen2_5_vl": lambda d: build_qwen2_vl(d, v2_5=True),
    "qwen3_vl": lambda d: build_qwen3_vl(d),
    "qwen3_vl_moe": lambda d: build_qwen3_vl(d, moe=True),  # 8 experts, top 2
    "internvl": lambda d: build_internvl(d),  # InternVL3: Qwen2 decoder
    "internvl3_5": lambda d: build_internvl(d, text_arch="qwen3"),
    # InternVL -hf checkpoints converted from InternLM2 decoders carry a Llama text config.
    "internvl_llama": lambda d: build_internvl(d, text_arch="llama"),
    # The original LLaVA repository's format, against transformers' LLaVA-NeXT on the same
    # weights, prompted with the Vicuna conversation format those checkpoints use.
    "llava_original": lambda d: build_llava_original(d, d + "-twin"),
    # LLaVA-1.5 originals (image_aspect_ratio "pad"), against transformers' LLaVA whose
    # processor pads images to a square the same way.
    "llava_original_1_5": lambda d: build_llava_original(d, d + "-twin", version="1.5"),
}


def reference(arch: str, model_dir: str) -> VLMReference:
    if arch.startswith("llava_original"):
        return VLMReference(model_dir + "-twin", chat_template=VICUNA_V1_TEMPLATE)
    return VLMReference(model_dir)


def requests(image_url: str) -> list[tuple[list[dict], list[int]]]:
    """(messages, indices of the test images they show), 8 of them."""
    one = lambda i, text: [  # noqa: E731
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"IMG{i}"}},
                                     {"type": "text", "text": text}]}
    ]  # fmt: skip
    two = [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "IMG0"}},
            {"type": "text", "text": "compare these"},
            {"type": "image_url", "image_url": "IMG1"},
        ]}
    ]  # fmt: skip
    text_only = [{"role": "user", "content": "no picture here, just words"}]
    follow_up = [
        *one(2, "what is it"),
        {"role": "assistant", "content": "a gradient"},
        {"role": "user", "content": "and the colours?"},
    ]
    return [
        (one(0, "describe"), [0]),
        (two, [0, 1]),
        (text_only, []),
        (one(1, "what colour"), [1]),
        (one(2, "tell me"), [2]),
        (follow_up, [2]),
        (one(0, "again, describe"), [0]),
        (two, [0, 1]),
    ]


def with_urls(messages: list[dict], by_http: bool, base: str) -> list[dict]:
    images = make_images()
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [dict(p) for p in content]
            for p in content:
                if p["type"] == "image_url":
                    key = (
                        p["image_url"]["url"]
                        if isinstance(p["image_url"], dict)
                        else p["image_url"]
                    )
                    i = int(key[3:])
                    url = f"{base}/{i}.png" if by_http else data_url(images[i])
                    p["image_url"] = {"url": url} if isinstance(p["image_url"], dict) else url
        out.append({"role": m["role"], "content": content})
    return out


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_vlm_matches_transformers(
    arch: str, tmp_path_factory: pytest.TempPathFactory, image_server: str
) -> None:
    root = tmp_path_factory.mktemp(arch)
    model_dir = BUILDERS[arch](str(root / "ckpt"))
    ref = reference(arch, model_dir)
    images = make_images()
    cases = requests("")
    expected = [ref.greedy(msgs, [images[i] for i in idx], MAX_NEW) for msgs, idx in cases]
    texts = [ref.text(tokens) for _, tokens in expected]
    del ref  # free its memory before the server starts
    config = Config(
        model=model_dir, run_id=new_run_id(), ipc_dir=str(root), server_name="127.0.0.1",
        server_port=free_port(), allowed_media_domains="127.0.0.1", log_level="WARNING",
        num_kv_blocks=256,
    )  # fmt: skip

    def ask_all(url: str) -> list:
        chats = [with_urls(msgs, i % 2 == 1, image_server) for i, (msgs, _) in enumerate(cases)]
        return greedy_chats(url, chats, MAX_NEW)

    with server(config, os.path.join(str(root), "server.log")) as srv:
        first = ask_all(srv["url"])
        again = ask_all(srv["url"])  # same images: from the encoder cache
    for i, (reply, (prompt_len, tokens)) in enumerate(zip(first, expected, strict=True)):
        label = f"{arch} request {i} ({len(cases[i][1])} images)"
        assert reply.usage.prompt_tokens == prompt_len, f"{label}: prompt tokens"
        assert reply.choices[0].message.content == texts[i], (
            f"{label}: differs from transformers' greedy tokens {tokens}"
        )
        assert reply.usage.completion_tokens == len(tokens), label
    assert [r.choices[0].message.content for r in again] == [
        r.choices[0].message.content for r in first
    ]


def test_text_model_refuses_images(checkpoints: dict, tmp_path_factory) -> None:  # noqa: ANN001
    root = tmp_path_factory.mktemp("textonly")
    config = Config(
        model=checkpoints["llama"], run_id=new_run_id(), ipc_dir=str(root),
        server_name="127.0.0.1", server_port=free_port(), log_level="WARNING",
    )  # fmt: skip
    img = data_url(make_images()[0])
    with server(config, os.path.join(str(root), "server.log")) as srv:
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="llama", max_tokens=4,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": img}},
                    {"type": "text", "text": "what is it"}]}],
            )  # fmt: skip
        assert "does not accept images" in err.value.body["message"]
        ok = client.chat.completions.create(
            model="llama", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
        assert ok.usage.completion_tokens >= 1


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_are_400s_and_the_loop_stays_free(
    tmp_path_factory: pytest.TempPathFactory, image_server: str
) -> None:
    root = tmp_path_factory.mktemp("badimages")
    model_dir = build_llava(str(root / "ckpt"))
    media = root / "media"
    media.mkdir()
    make_images()[0].save(media / "ok.png")
    make_images()[1].save(root / "outside.png")
    good = png_bytes(make_images()[2])
    config = Config(
        model=model_dir, run_id=new_run_id(), ipc_dir=str(root), server_name="127.0.0.1",
        server_port=free_port(), allowed_media_domains="127.0.0.1", log_level="WARNING",
        allowed_local_media_path=str(media), limit_mm_per_prompt=2, image_max_pixels=1_000_000,
    )  # fmt: skip
    port = image_server.rsplit(":", 1)[1]
    bad = {
        "bad base64": "data:image/png;base64,@@not-base64@@",
        "not an image": "data:image/png;base64," + base64.b64encode(b"hello, text").decode(),
        "truncated": "data:image/png;base64," + base64.b64encode(good[: len(good) // 2]).decode(),
        "too many pixels": data_url(Image.new("1", (2000, 2000))),
        "outside the allowed root": f"file://{root}/outside.png",
        "loopback host not allowed": f"http://localhost:{port}/0.png",
        "no such file here": f"{image_server}/missing.png",
    }

    def chat(client: openai.OpenAI, urls: list[str]) -> object:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        return client.chat.completions.create(
            model="ckpt", max_tokens=3, temperature=0,
            messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}],
        )  # fmt: skip

    with server(config, os.path.join(str(root), "server.log")) as srv:
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        for case, url in bad.items():
            with pytest.raises(openai.BadRequestError) as err:
                chat(client, [url])
            assert err.value.body["message"] and err.value.body["param"] == "messages", case
            assert chat(client, [f"file://{media}/ok.png"]).usage.completion_tokens >= 1, case
        with pytest.raises(openai.BadRequestError, match="2"):
            chat(client, [data_url(make_images()[0])] * 3)

        # Large images keep threads busy decoding; the event loop must still answer at once.
        big = data_url(
            Image.fromarray(
                np.random.default_rng(1).integers(0, 256, (900, 1000, 3), dtype=np.uint8)
            )
        )

        async def busy_and_health() -> float:
            def one() -> object:
                return chat(
                    openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0),
                    [big],
                )

            jobs = [asyncio.ensure_future(asyncio.to_thread(one)) for _ in range(4)]
            await asyncio.sleep(0.3)
            worst = 0.0
            async with httpx.AsyncClient() as http:
                for _ in range(5):
                    started = time.monotonic()
                    assert (await http.get(srv["url"] + "/health")).status_code == 200
                    worst = max(worst, time.monotonic() - started)
                    await asyncio.sleep(0.1)
            await asyncio.gather(*jobs)
            return worst

        assert asyncio.run(busy_and_health()) < 1.0, "/health waited behind image work"
