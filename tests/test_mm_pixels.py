"""Per-request `mm_processor_kwargs` min_pixels / max_pixels for the Qwen-VL family.

A request's bounds size its images (and Qwen2/2.5-VL's video frames) as transformers'
processor does when given the same kwargs at call time; --mm-max-pixels is the ceiling a
request may not pass (and lowers the checkpoint's own max_pixels when below it); the encoder
and prefix caches key on the resized pixels, so the same image at two sizes never shares an
entry. The reference is transformers' image processor called with the same kwargs and
transformers `generate`; video frames are chosen to need no resizing under the request's
bounds (the video processor's resize needs torchvision, which has no build here), while the
checkpoint's own bounds would resize them, so the request's bounds are what sized them.
"""

from __future__ import annotations

import asyncio
import types

import msgspec
import numpy as np
import openai
import pytest
import torch
import transformers
from PIL import Image
from server_fixtures import local_config
from test_video import (
    all_frames,
    check_reply,
    greedy_one,
    make_clip,
    processor_sampling,
    video_data_url,
    video_part,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from vlm_reference import data_url

from vlmserve.deploy.launcher import server
from vlmserve.frontend.errors import APIError
from vlmserve.frontend.prompts import Prompter
from vlmserve.frontend.routes.chat import pixel_bounds
from vlmserve.frontend.schemas import ChatCompletionRequest
from vlmserve.frontend.video import Sampling, decode_video
from vlmserve.shared.config import Config
from vlmserve.shared.models.qwen2_vl import PixelBounds
from vlmserve.workers.demo_qwen3_vl import build_qwen3_vl
from vlmserve.workers.demo_vlm import build_qwen2_vl

MAX_NEW = 10
CAP = 60_000  # --mm-max-pixels of the live server: above the demo's 50176, so a request may
# ask for more than the checkpoint's max_pixels, up to this
CLIP_W, CLIP_H = 280, 196  # 54880 pixels: over the demo's 50176 (resized by default), within
# a request's max_pixels of 54880 (not resized: multiples of 28)


def big() -> Image.Image:  # 60000 pixels: resized down by every bound used here
    return Image.linear_gradient("L").resize((300, 200)).convert("RGB").rotate(30)


def small() -> Image.Image:  # 2400 pixels: below the demo's min_pixels 3136 (resized up)
    return Image.radial_gradient("L").resize((60, 40)).convert("RGB")


def image_turn(image: Image.Image, text: str) -> list[dict]:
    image_part = {"type": "image_url", "image_url": {"url": data_url(image)}}
    return [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:  # noqa: ANN001
    return build_qwen2_vl(str(tmp_path_factory.mktemp("mm_pixels") / "ckpt"))


def chat_request(messages: list[dict], **kwargs: int) -> ChatCompletionRequest:
    body = {"messages": messages, "mm_processor_kwargs": kwargs}
    return msgspec.convert(body, ChatCompletionRequest)


def test_prompter_sizes_images_as_transformers(ckpt: str) -> None:
    """The frontend's arrays and placeholder counts equal transformers' processor given the same
    kwargs: max only, min only, both, and the ceiling lowering the checkpoint's max_pixels;
    the cache key follows the resized grid, not the bounds that gave it."""
    prompter = Prompter(ckpt, 4096)
    ip = transformers.AutoImageProcessor.from_pretrained(ckpt)
    grids, keys = {}, {}
    cases = {  # name: (image, the request's PixelBounds, transformers' call kwargs)
        "max": (big(), PixelBounds(max_pixels=6272), {"max_pixels": 6272}),
        "min": (small(), PixelBounds(min_pixels=20000), {"min_pixels": 20000}),
        "both": (big(), PixelBounds(3136, 20000), {"min_pixels": 3136, "max_pixels": 20000}),
        "capped": (big(), PixelBounds(cap=40000), {"max_pixels": 40000}),
        "max_same_grid": (big(), PixelBounds(max_pixels=6300), {"max_pixels": 6300}),
        "default": (big(), None, {}),
    }
    for name, (image, pixels, kwargs) in cases.items():
        request = chat_request(image_turn(image, "what"))
        ids, placed = prompter.chat_inputs(request.messages, [image], pixels=pixels)
        want = ip(images=[image], return_tensors="np", **kwargs)
        grid = want["image_grid_thw"][0].tolist()
        assert placed[0].arrays["image_grid_thw"].tolist() == [grid], name
        np.testing.assert_array_equal(placed[0].arrays["pixel_values"], want["pixel_values"])
        assert placed[0].length == np.prod(grid) // 4 == ids.count(prompter.images.image_token_id)
        grids[name], keys[name] = grid, placed[0].hash
    assert len({tuple(g) for g in grids.values()}) == 5, grids  # five sizes, "max_same_grid" aside
    assert grids["max"] == grids["max_same_grid"] and keys["max"] == keys["max_same_grid"]
    assert len(set(keys.values())) == 5, keys  # one key per resized size


def test_qwen3_vl_sizes_images_not_videos(tmp_path) -> None:  # noqa: ANN001
    """Qwen3-VL (32-pixel merged patches): a request's bounds size its images as transformers'
    image processor given them; its videos keep the video processor's clip-wide `size`
    (Qwen3VLVideoProcessor takes no min_pixels / max_pixels), as transformers' processor does."""
    ckpt3 = build_qwen3_vl(str(tmp_path / "qwen3_vl"))
    prompter = Prompter(ckpt3, 4096)
    ip = transformers.AutoImageProcessor.from_pretrained(ckpt3)
    assert prompter.images.factor == 32
    video = decode_video(make_clip(), Sampling(2.0, 32, 2, 60.0, 10**6, linspace=True))
    image_part = {"type": "image_url", "image_url": {"url": "IMG"}}
    text_part = {"type": "text", "text": "what"}
    turn = [{"role": "user", "content": [image_part, video_part("VIDEO"), text_part]}]
    request = chat_request(turn)
    _, plain = prompter.chat_inputs(request.messages, [big()], videos=[video])
    grids = set()
    for kwargs in ({"max_pixels": 32 * 32 * 6}, {"min_pixels": 32 * 32 * 80}):
        pixels = PixelBounds(kwargs.get("min_pixels"), kwargs.get("max_pixels"))
        ids, placed = prompter.chat_inputs(request.messages, [big()], videos=[video], pixels=pixels)
        want = ip(images=[big()], return_tensors="np", **kwargs)
        np.testing.assert_array_equal(placed[0].arrays["image_grid_thw"], want["image_grid_thw"])
        np.testing.assert_array_equal(placed[0].arrays["pixel_values"], want["pixel_values"])
        for name, array in plain[1].arrays.items():  # the video as without the request's bounds
            np.testing.assert_array_equal(placed[1].arrays[name], array)
        grids.add(tuple(want["image_grid_thw"][0].tolist()))
    assert len(grids | {tuple(plain[0].arrays["image_grid_thw"][0].tolist())}) == 3, grids


def test_bad_bounds_name_the_field(ckpt: str) -> None:
    """Out of range, below one merged patch, min above max, over the ceiling, and a family
    without these knobs: 400s naming the field (in process: what the route raises)."""
    qwen = types.SimpleNamespace(prompter=Prompter(ckpt, 4096), config=Config(mm_max_pixels=CAP))
    uncapped = types.SimpleNamespace(prompter=qwen.prompter, config=Config())
    text_only = types.SimpleNamespace(
        prompter=types.SimpleNamespace(images=None), config=Config(mm_max_pixels=CAP)
    )
    messages = [{"role": "user", "content": "hi"}]
    cases = [  # (state, kwargs, param, gist)
        (qwen, {"max_pixels": CAP + 1}, "max_pixels", "--mm-max-pixels"),
        (qwen, {"min_pixels": CAP + 1}, "min_pixels", "--mm-max-pixels"),
        (uncapped, {"max_pixels": 50177}, "max_pixels", "checkpoint's max_pixels"),
        (qwen, {"max_pixels": 783}, "max_pixels", "one merged patch"),
        (qwen, {"min_pixels": 40000, "max_pixels": 20000}, "min_pixels", "above max_pixels"),
        (qwen, {"max_pixels": 1000}, "max_pixels", "3136 (the server's)"),  # the demo's min
        (text_only, {"min_pixels": 3136}, "min_pixels", "takes no min_pixels"),
    ]
    for state, kwargs, param, gist in cases:
        with pytest.raises(APIError) as err:
            pixel_bounds(chat_request(messages, **kwargs), state)
        body = msgspec.json.decode(err.value.to_json())["error"]
        assert body["param"] == f"mm_processor_kwargs.{param}", (kwargs, body)
        assert gist in body["message"], (kwargs, body)
    assert pixel_bounds(chat_request(messages), uncapped) is None  # the checkpoint's own
    assert pixel_bounds(chat_request(messages), qwen) == PixelBounds(cap=CAP)
    smallest = chat_request(messages, min_pixels=784, max_pixels=784)
    assert pixel_bounds(smallest, qwen) == PixelBounds(784, 784, CAP)


def reference(model, ckpt: str, messages: list[dict], images: list, videos: list, **kwargs):  # noqa: ANN001, ANN201
    """transformers' (prompt tokens, greedy tokens): images through its image processor with
    the request's kwargs, videos (frames, fps) that need no resizing under them."""
    for frames, _ in videos:
        h, w = frames.shape[1:3]
        bounds = (kwargs.get("min_pixels", 3136), kwargs.get("max_pixels", 50176))
        assert smart_resize(h, w, 28, *bounds) == (h, w), "the reference cannot resize frames"
    return greedy_one(ckpt, model, messages, videos, images, **kwargs)


def ask_together(url: str, requests: list[tuple[list[dict], dict]]) -> list:
    """The server's greedy answers to (messages, mm_processor_kwargs), all in flight at once."""

    async def ask_all() -> list:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        try:
            return await asyncio.gather(
                *[
                    client.chat.completions.create(
                        model="ckpt",
                        messages=messages,
                        max_tokens=MAX_NEW,
                        temperature=0,
                        extra_body={"mm_processor_kwargs": kwargs} if kwargs else None,
                    )  # fmt: skip
                    for messages, kwargs in requests
                ]
            )
        finally:
            await client.close()

    return asyncio.run(ask_all())


def test_server_sizes_by_request(ckpt: str, tmp_path) -> None:  # noqa: ANN001
    """One image at three sizes (the checkpoint's, max_pixels 6272, max_pixels 20000), a small
    one raised by min_pixels, and a video whose frames a request's max_pixels keeps at full
    size, all in flight together, then again from the caches: each has transformers' prompt
    tokens and greedy tokens for the same kwargs. The video at the checkpoint's bounds has the
    prompt length transformers' sizing gives. Bad bounds are 400s naming the field and the
    server goes on."""
    clip = make_clip(width=CLIP_W, height=CLIP_H)  # 8 frames at 4 fps
    frames = all_frames(clip)[processor_sampling(8, 4.0, 2.0)]  # the default 2 fps
    model = transformers.AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
    model.eval()
    text_part = {"type": "text", "text": "what moves"}
    video_turn = [{"role": "user", "content": [video_part(video_data_url(clip)), text_part]}]
    cases = [  # (messages, mm_processor_kwargs, images, videos)
        (image_turn(big(), "describe"), {}, [big()], []),
        (image_turn(big(), "describe"), {"max_pixels": 6272}, [big()], []),
        (image_turn(big(), "describe"), {"max_pixels": 20000}, [big()], []),
        (image_turn(small(), "and this"), {"min_pixels": 20000}, [small()], []),
        (video_turn, {"max_pixels": CLIP_W * CLIP_H}, [], [(frames, 2.0)]),
    ]
    expected = [reference(model, ckpt, m, i, v, **k) for m, k, i, v in cases]
    image_lengths = [prompt_len for prompt_len, _ in expected[:3]]
    assert len(set(image_lengths)) == 3, image_lengths
    # The video at the checkpoint's bounds: 4 frames (2 temporal patches) resized by them.
    h, w = smart_resize(CLIP_H, CLIP_W, 28, 3136, 50176)
    assert (h, w) != (CLIP_H, CLIP_W)
    default_video_len = expected[4][0] - 2 * (CLIP_H * CLIP_W - h * w) // 28**2
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    config = local_config(
        ckpt, tmp_path, mm_max_pixels=CAP, num_kv_blocks=512, block_size=4,
        max_batched_tokens=64, max_batch_size=8,
    )  # fmt: skip
    with server(config, str(tmp_path / "server.log")) as srv:
        for round_ in ("first", "cached"):
            replies = ask_together(
                srv["url"], [(m, k) for m, k, _, _ in cases] + [(video_turn, {})]
            )
            for (_, kwargs, _, _), want, reply in zip(cases, expected, replies, strict=False):
                check_reply(tokenizer, f"{round_} round, {kwargs}", reply, want)
            assert replies[-1].usage.prompt_tokens == default_video_len, round_
            if round_ == "first":
                refuse_bad_bounds(srv["url"])


def refuse_bad_bounds(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    bad = [  # (mm_processor_kwargs, param)
        ({"max_pixels": CAP + 1}, "max_pixels"),
        ({"min_pixels": 40000, "max_pixels": 20000}, "min_pixels"),
        ({"max_pixels": 1.5}, "max_pixels"),
        ({"min_pixels": "many"}, "min_pixels"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"max_pixels": 100}, "max_pixels"),
    ]
    for kwargs, param in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="ckpt", messages=image_turn(small(), "what"), max_tokens=2,
                extra_body={"mm_processor_kwargs": kwargs},
            )  # fmt: skip
        assert err.value.body["param"] == f"mm_processor_kwargs.{param}", (kwargs, err.value.body)
