"""Idefics3 and SmolVLM against transformers.

Each image is split into sub-images plus a global one, and its span in the prompt holds the
separators between them (`<fake_token_around_image>`, `<row_r_col_c>`, newlines, `<global-img>`),
so only some of the span's rows take the vision half's output. The input side must expand and
tokenize as transformers' processor does; through the real server, 8 requests in flight (one
image, two images, text only, by data URL and by http URL) must give transformers' greedy tokens
with exact `usage.prompt_tokens`, with prefill chunks and cached prefix blocks that end inside
images (between and within sub-images), twice (encoder cache and prefix cache the second time);
SmolVLM at --tp 2.
"""

from __future__ import annotations

import json
import os

import msgspec
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from server_fixtures import file_server, local_config
from vlm_reference import (
    VLMReference,
    assert_served_like_transformers,
    greedy_chats,
    idefics3_processor,
    template_messages,
    user_turn,
    with_image_urls,
)

from vlmserve.deploy.launcher import server
from vlmserve.frontend.prompts import Prompter, drops_string_content
from vlmserve.frontend.schemas import ChatMessage
from vlmserve.shared.models import checkpoint_spec
from vlmserve.workers.demo_idefics3 import SEQ_LEN, build_idefics3

MAX_NEW = 10
REAL_SMOLVLM = os.path.join(
    os.path.dirname(__file__), "data", "realconfigs", "HuggingFaceTB__SmolVLM2-256M-Video-Instruct"
)


def make_images() -> list[Image.Image]:
    """Seeded noise, a flat colour and a gradient: 2x3, 2x3 and 3x3 sub-images for the Idefics3
    demo (images up to 96 pixels, 32-pixel frames), 2x2, 1x2 and 2x2 for SmolVLM's (64)."""
    noise = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    return [
        Image.fromarray(noise),
        Image.new("RGB", (70, 30), (10, 200, 30)),
        Image.linear_gradient("L").resize((64, 64)).convert("RGB"),
    ]


TWO = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "IMG0"}},
    {"type": "text", "text": "compare these"},
    {"type": "image_url", "image_url": {"url": "IMG1"}},
]}]  # fmt: skip
CHATS = [  # (messages, indices of the images they show)
    (user_turn(0, "describe"), [0]),
    (TWO, [0, 1]),
    ([{"role": "user", "content": "no picture here, just words"}], []),
    (user_turn(1, "what colour"), [1]),
    (user_turn(2, "tell me"), [2]),
    (
        [
            *user_turn(2, "what is it"),
            {"role": "assistant", "content": "a gradient"},
            {"role": "user", "content": "and the colours?"},
        ],
        [2],
    ),  # fmt: skip
    (user_turn(0, "again, describe"), [0]),
    (TWO, [0, 1]),
]


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("idefics3-images")
    for i, img in enumerate(make_images()):
        img.save(root / f"{i}.png")
    with file_server(str(root)) as url:
        yield url


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp(request.param)
    return build_idefics3(str(root / "ckpt"), smolvlm=request.param == "smolvlm")


@pytest.mark.parametrize("split", [True, False])
def test_prompt_and_frames_as_transformers_processor(checkpoint: str, split: bool) -> None:
    """Our expansion, tokenization and per-image frames equal transformers' processor's, with
    the image processor splitting images and without; each image's span holds exactly its
    frames' placeholders and the separators between them."""
    processor = idefics3_processor(checkpoint)
    processor.image_processor.do_image_splitting = split
    ours = checkpoint_spec(checkpoint).image_processor(checkpoint)
    ours.image_processor.do_image_splitting = split
    image_id = processor.image_token_id
    for messages, idx in CHATS:
        images = [make_images()[i] for i in idx]
        text = processor.tokenizer.apply_chat_template(
            template_messages(messages), tokenize=False, add_generation_prompt=True
        )
        if not images:
            continue
        theirs = processor(text=[text], images=images, return_tensors="np")
        ids, placed = ours.process(text, images)
        assert ids == theirs["input_ids"][0].tolist(), f"{messages}: token ids"
        frames = np.concatenate([p.arrays["pixel_values"] for p in placed])
        np.testing.assert_array_equal(frames, theirs["pixel_values"][0])
        masks = np.concatenate([p.arrays["pixel_attention_mask"] for p in placed])
        np.testing.assert_array_equal(masks, theirs["pixel_attention_mask"][0])
        for p in placed:
            span = np.array(ids[p.offset : p.offset + p.length])
            n = int(p.arrays["frames"][0])
            assert n == len(p.arrays["pixel_values"]) and (n > 1) == split
            assert (span == image_id).sum() == n * SEQ_LEN
            assert span[0] == span[-1] == image_id and ids[p.offset - 1] != image_id


def test_placeholders_that_do_not_pair_with_images_are_refused(checkpoint: str) -> None:
    """A prompt whose `<image>` count differs from its images' (a user who typed `<image>`)
    is a ValueError, which the frontend answers with a 400 naming `messages`."""
    ours = checkpoint_spec(checkpoint).image_processor(checkpoint)
    image = make_images()[0]
    for text, images in (("<image> and <image>", [image]), ("none here", [image, image])):
        with pytest.raises(ValueError, match="placeholders for"):
            ours.process(text, images)


def test_template_reading_only_content_parts_gets_strings_as_parts(checkpoint: str) -> None:
    """SmolVLM2's published template writes nothing of a plain-string content: the frontend
    gives such a template every string as one text part; a template that takes strings (the
    demo's) is left as it is."""

    published = os.path.join(REAL_SMOLVLM, "chat_template.json")
    prompter = Prompter(checkpoint, 4096)
    assert not prompter.parts_only
    messages = msgspec.convert(
        [{"role": "user", "content": "how is the weather"},
         {"role": "assistant", "content": "sunny"}, {"role": "user", "content": "and later?"}],
        list[ChatMessage],
    )  # fmt: skip
    demo = prompter.render_chat(messages)
    with open(published) as f:
        prompter.tokenizer.chat_template = json.load(f)["chat_template"]
    prompter.parts_only = drops_string_content(prompter.tokenizer)
    assert prompter.parts_only
    rendered = prompter.render_chat(messages)
    # The published format, which the demo's template writes from strings (its BOS aside).
    assert rendered == "<|im_start|>" + demo.removeprefix("<|im_start|>")
    assert "how is the weather" in prompter.render_chat_text("how is the weather")


def test_vision_half_rows_equal_transformers(checkpoint: str) -> None:
    """Our vision half, on two images batched (their frames one after another), returns per
    image exactly transformers' image features, as many rows as the image's placeholders."""
    from vlmserve.workers.models.registry import build_model

    spec = checkpoint_spec(checkpoint)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    model = build_model(spec, spec.hf_config(checkpoint))
    ours = model.vision
    state = {
        model.map_checkpoint_name(k).removeprefix("vision."): v for k, v in ref.state_dict().items()
    }
    ours.load_state_dict({k: v for k, v in state.items() if k.startswith("hf.")})
    images = make_images()
    _, placed = spec.image_processor(checkpoint).process("<image> and <image>", images[:2])
    batch = {
        k: torch.cat([torch.from_numpy(p.arrays[k]) for p in placed]) for k in placed[0].arrays
    }
    with torch.no_grad():
        rows = ours(batch)
        for p, got in zip(placed, rows, strict=True):
            pixels = torch.from_numpy(p.arrays["pixel_values"])[None]
            mask = torch.from_numpy(p.arrays["pixel_attention_mask"])[None]
            want = ref.get_image_features(pixels, mask).pooler_output[0]
            assert got.shape[0] == int(p.arrays["frames"][0]) * SEQ_LEN
            torch.testing.assert_close(got, want)


def test_served_like_transformers(
    checkpoint: str, image_server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ref = VLMReference(checkpoint)
    images = make_images()
    expected = [ref.greedy(msgs, [images[i] for i in idx], MAX_NEW) for msgs, idx in CHATS]
    texts = [ref.text(tokens) for _, tokens in expected]
    del ref
    smolvlm = checkpoint_spec(checkpoint).family == "smolvlm"
    # Small steps: prefill chunks end inside images, mid sub-image and on separators, beside
    # other requests' chunks and decodes; 4-token blocks put cached prefixes there too.
    config = local_config(
        checkpoint, str(tmp_path_factory.mktemp("server")), allowed_media_domains="127.0.0.1",
        max_batched_tokens=7 if smolvlm else 19, max_batch_size=4 if smolvlm else 8,
        block_size=4, num_kv_blocks=1024,
        tp=2 if smolvlm else 1,
    )  # fmt: skip

    def ask_all(url: str) -> list:
        chats = [
            with_image_urls(msgs, make_images(), image_server if i % 2 else None)
            for i, (msgs, _) in enumerate(CHATS)
        ]
        return greedy_chats(url, chats, MAX_NEW)

    with server(config, os.path.join(config.ipc_dir, "server.log")) as srv:
        first = ask_all(srv["url"])
        again = ask_all(srv["url"])  # encoder cache, prefixes cut mid-image
    assert_served_like_transformers(
        {"first": first, "cached": again}, expected, texts, [len(idx) for _, idx in CHATS]
    )
