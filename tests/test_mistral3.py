"""Mistral 3 (Mistral Small 3.1 / 3.2 in Hugging Face format) against transformers.

Each image keeps its aspect ratio, so images differ in their rows and columns of `[IMG]`
tokens; every row ends in `[IMG_BREAK]` and the last in `[IMG_END]`, so an image's span holds
text tokens between its placeholders. The input side must expand and tokenize as transformers'
PixtralProcessor does; the vision half must give transformers' rows per image, images of
different sizes batched; through the real server, 8 requests in flight (one image, two images,
text only, by data URL and by http URL) must give transformers' greedy tokens with exact
`usage.prompt_tokens`, with prefill chunks and cached prefix blocks that end inside images
(mid-row and on row breaks), twice (encoder cache and prefix cache the second time), and two
prompts whose token ids are the same but whose images differ must not share cached blocks; an
[IMG] typed into a message is a 400 naming `messages`, and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from server_fixtures import file_server, local_config, metrics, wait_for
from vlm_reference import (
    VLMReference,
    assert_served_like_transformers,
    greedy_chats,
    pixtral_processor,
    template_messages,
    user_turn,
    with_image_urls,
)

from vlmserve.deploy.launcher import server
from vlmserve.shared.models import checkpoint_spec
from vlmserve.workers.demo_mistral3 import MERGE, PATCH, build_mistral3
from vlmserve.workers.loader import load_model

MAX_NEW = 10
IMG, BREAK, END = 10, 12, 13  # [IMG], [IMG_BREAK], [IMG_END] at Mistral's ids


def make_images() -> list[Image.Image]:
    """A wide noise image, a flat wide one, a tall gradient, a tiny one (one row) and noise of
    the first one's size with other pixels (the same placeholders, other content)."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)),
        Image.new("RGB", (70, 30), (10, 200, 30)),
        Image.linear_gradient("L").resize((24, 56)).convert("RGB"),
        Image.fromarray(rng.integers(0, 256, (6, 13, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)),
    ]


TWO = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "IMG0"}},
    {"type": "text", "text": "compare these"},
    {"type": "image_url", "image_url": {"url": "IMG2"}},
]}]  # fmt: skip
CHATS = [  # (messages, indices of the images they show)
    (user_turn(0, "describe"), [0]),
    (TWO, [0, 2]),
    ([{"role": "user", "content": "no picture here, just words"}], []),
    (user_turn(1, "what colour"), [1]),
    (user_turn(4, "describe"), [4]),  # chat 0's token ids, other pixels
    (
        [
            {"role": "system", "content": "be brief"},
            *user_turn(2, "what is it"),
            {"role": "assistant", "content": "a gradient"},
            {"role": "user", "content": "and the colours?"},
        ],
        [2],
    ),
    (user_turn(3, "tiny"), [3]),
    (TWO, [0, 2]),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_mistral3(str(tmp_path_factory.mktemp("mistral3") / "ckpt"))


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mistral3-images")
    for i, img in enumerate(make_images()):
        img.save(root / f"{i}.png")
    with file_server(str(root)) as url:
        yield url


def test_prompt_and_pixels_as_transformers_processor(checkpoint: str) -> None:
    """Our expansion and tokenization equal PixtralProcessor's; each image's span runs from its
    first [IMG] to its last, holding one run of [IMG] per row with [IMG_BREAK] between rows and
    [IMG_END] after it; its patches rebuild the processor's pixels of that image; the images
    have different row and column counts."""
    processor = pixtral_processor(checkpoint)
    ours = checkpoint_spec(checkpoint).image_processor(checkpoint)
    grids = set()
    for messages, idx in CHATS:
        images = [make_images()[i] for i in idx]
        text = processor.tokenizer.apply_chat_template(
            template_messages(messages), tokenize=False, add_generation_prompt=True
        )
        theirs = processor(
            text=[text], images=images or None, return_tensors="np", add_special_tokens=False
        )
        ids, placed = ours.process(text, images)
        assert ids == theirs["input_ids"][0].tolist(), f"{messages}: token ids"
        assert ids.count(1) == 1, "one BOS"
        assert len(placed) == len(images)
        for i, p in enumerate(placed):
            h, w = (int(v) for v in p.arrays["image_sizes"][0])
            np.testing.assert_array_equal(p.arrays["image_sizes"][0], theirs["image_sizes"][i])
            rows, cols = h // (PATCH * MERGE), w // (PATCH * MERGE)
            grids.add((rows, cols))
            span = ids[p.offset : p.offset + p.length]
            want = ([IMG] * cols + [BREAK]) * (rows - 1) + [IMG] * cols
            assert span == want and ids[p.offset + p.length] == END
            np.testing.assert_array_equal(pixels(p).numpy(), theirs["pixel_values"][i, :, :h, :w])
    assert {(3, 6), (6, 3), (1, 2)} <= grids, grids


def test_placeholders_that_do_not_pair_with_images_are_refused(checkpoint: str) -> None:
    """A prompt whose [IMG] count differs from its images' (a user who typed [IMG]) is a
    ValueError, which the frontend answers with a 400 naming `messages`."""
    ours = checkpoint_spec(checkpoint).image_processor(checkpoint)
    image = make_images()[0]
    for text, images in (("[IMG] and [IMG]", [image]), ("none here", [image, image])):
        with pytest.raises(ValueError, match="placeholders for"):
            ours.process(text, images)


def test_lm_head_tied_only_when_the_checkpoint_has_nuser_turn(
    checkpoint: str, tmp_path: Path
) -> None:
    """Mistral Small 3.1's config.json (like the demo's) does not say tie_word_embeddings, which
    transformers' Mistral3Config reads as True, and its checkpoint holds its own lm_head, which
    transformers loads untied: the loader unties it too. Without an lm_head, both tie."""
    with open(os.path.join(checkpoint, "config.json")) as f:
        assert "tie_word_embeddings" not in json.load(f)
    assert transformers.AutoConfig.from_pretrained(checkpoint).tie_word_embeddings
    ours = load_model(checkpoint, torch.float32, torch.device("cpu")).language
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    ref = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint)
    embed = ref.model.language_model.embed_tokens.weight
    assert not torch.equal(ref.lm_head.weight, embed)
    tied = str(tmp_path / "tied")
    shutil.copytree(checkpoint, tied)
    weights = load_file(os.path.join(tied, "model.safetensors"))
    head = [k for k in weights if k.endswith("lm_head.weight")]
    assert len(head) == 1
    del weights[head[0]]
    save_file(weights, os.path.join(tied, "model.safetensors"), metadata={"format": "pt"})
    ours = load_model(tied, torch.float32, torch.device("cpu")).language
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ref = transformers.AutoModelForImageTextToText.from_pretrained(tied)
    assert ref.lm_head.weight.data_ptr() == ref.model.language_model.embed_tokens.weight.data_ptr()


def test_vision_half_rows_equal_transformers(checkpoint: str) -> None:
    """Our vision half, on four images of different sizes batched (their patches one after
    another), returns per image transformers' image features, one row per [IMG] token; the
    tower runs on groups of them of at most one largest image's patches (12 x 12 here): the
    first alone (8 x 12), the next two together (12 x 6 and 2 x 4), the last alone (6 x 12)."""
    from vlmserve.workers.models.registry import build_model

    spec = checkpoint_spec(checkpoint)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    model = build_model(spec, spec.hf_config(checkpoint))
    state = {
        model.map_checkpoint_name(k).removeprefix("vision."): v for k, v in ref.state_dict().items()
    }
    model.vision.load_state_dict({k: v for k, v in state.items() if k.startswith("hf.")})
    images = [make_images()[i] for i in (0, 2, 3, 1)]
    ids, placed = spec.image_processor(checkpoint).process("[IMG][IMG] and [IMG][IMG]", images)
    batch = {
        k: torch.cat([torch.from_numpy(p.arrays[k]) for p in placed]) for k in placed[0].arrays
    }
    calls = []
    tower = model.vision.image_features

    def spy(arrays: dict) -> object:
        calls.append(arrays["image_sizes"].tolist())
        return tower(arrays)

    model.vision.image_features = spy
    with torch.no_grad():
        rows = model.vision(batch)
        assert calls == [[[32, 48]], [[48, 24], [8, 16]], [[24, 48]]]
        for p, got in zip(placed, rows, strict=True):
            h, w = (int(v) for v in p.arrays["image_sizes"][0])
            alone = pixels(p)[None]  # transformers' tower on this image alone, unpadded
            want = ref.model.get_image_features(alone, torch.tensor([[h, w]])).pooler_output[0]
            assert got.shape[0] == ids[p.offset : p.offset + p.length].count(IMG)
            # Our tower runs transformers' modules batched and padded otherwise; float noise only.
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def pixels(placed: object) -> torch.Tensor:
    """A placed image's pixels [3, h, w] from its patches."""
    h, w = (int(v) for v in placed.arrays["image_sizes"][0])
    patches = torch.from_numpy(placed.arrays["pixel_patches"])
    grid = patches.view(h // PATCH, w // PATCH, 3, PATCH, PATCH).permute(2, 0, 3, 1, 4)
    return grid.reshape(3, h, w)


def test_served_like_transformers(
    checkpoint: str, image_server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ref = VLMReference(checkpoint)
    images = make_images()
    expected = [ref.greedy(msgs, [images[i] for i in idx], MAX_NEW) for msgs, idx in CHATS]
    texts = [ref.text(tokens) for _, tokens in expected]
    del ref
    # The same token ids with other pixels must answer otherwise, or a prefix cache keyed on
    # tokens alone could pass.
    assert expected[0][0] == expected[4][0] and expected[0][1] != expected[4][1]
    # Small steps: prefill chunks end inside images, mid-row and on row breaks, beside other
    # requests' chunks and decodes; 4-token blocks put cached prefixes there too.
    config = local_config(
        checkpoint, str(tmp_path_factory.mktemp("server")), allowed_media_domains="127.0.0.1",
        max_batched_tokens=11, max_batch_size=8, block_size=4, num_kv_blocks=1024,
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
        hits = wait_for(
            lambda: metrics(srv["url"]).get("vlmserve:prefix_cache_hits_total", 0),
            10,
            "prefix cache hits",
        )
        # An [IMG] typed into the text leaves one image with two places: a 400 naming the
        # messages, and the server goes on serving.
        typed = user_turn(0, "is [IMG] here")
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="ckpt", messages=with_image_urls(typed, make_images(), None), max_tokens=2
            )
        assert err.value.body["param"] == "messages", err.value.body
        after = client.chat.completions.create(
            model="ckpt",
            messages=with_image_urls(CHATS[3][0], make_images(), None),
            max_tokens=MAX_NEW,
            temperature=0,
        )
        assert after.choices[0].message.content == texts[3]
    assert hits > 0
    assert_served_like_transformers(
        {"first": first, "cached": again}, expected, texts, [len(idx) for _, idx in CHATS]
    )
