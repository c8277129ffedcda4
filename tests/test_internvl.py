"""InternVL3 / 3.5 in Hugging Face format against transformers (float32, CPU).

The input side must write what transformers' InternVLProcessor writes (tiles by aspect ratio
plus a thumbnail, `<img>`, rows of `<IMG_CONTEXT>`, `</img>`) for images of 1 to 5 tiles; the
vision half must give each image exactly as many rows as its placeholders, equal to
transformers' image features; and through the real server at --tp 2, InternVL3.5 (Qwen3
decoder) with 7-token steps and 4-token blocks, so that prefill chunks and cached prefixes cut
through an image's tiles, answers like transformers twice, the second time from the prefix
cache, which must tell apart two images of the same size and different pixels; a placeholder
typed into a message is a 400 naming the messages. The 8 mixed requests (1 and 2 images, text
only) are in test_vlm.py, InternVL3 and 3.5 among them; a config of transformers' InternVL
defaults, shrunk, in test_real_configs.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import numpy as np
import openai
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from server_fixtures import local_config, metrics, wait_for
from vlm_reference import (
    VLMReference,
    assert_served_like_transformers,
    data_url,
    internvl_processor,
    with_images_in_order,
)

from vlmserve.deploy.launcher import server
from vlmserve.shared.models import checkpoint_spec
from vlmserve.workers.demo_internvl import MAX_TILES, build_internvl
from vlmserve.workers.loader import load_model

MAX_NEW = 10


def _images() -> list[Image.Image]:
    """Wide, tall, square and odd shapes: 1 to MAX_TILES tiles, a thumbnail beside several."""
    rng = np.random.default_rng(3)
    shapes = [(56, 56), (112, 40), (30, 120), (200, 60), (90, 70), (13, 170)]  # (width, height)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]


def _prompt(model_dir: str, count: int) -> str:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    parts = [{"type": "image"}] * count + [{"type": "text", "text": "what are these"}]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def internvl3(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_internvl(str(tmp_path_factory.mktemp("internvl3") / "ckpt"))


def test_prompt_and_tiles_match_internvl_processor(internvl3: str) -> None:
    images = _images()
    text = _prompt(internvl3, len(images))
    ids, placed = checkpoint_spec(internvl3).image_processor(internvl3).process(text, images)
    expected = internvl_processor(internvl3)(text=[text], images=images, return_tensors="np")
    want = expected["input_ids"][0].tolist()
    differ = [i for i, (a, b) in enumerate(zip(ids, want, strict=False)) if a != b]
    first = differ[0] if differ else min(len(ids), len(want))
    assert ids == want, f"token ids differ from InternVLProcessor's from position {first}"
    tiles = [int(p.arrays["num_patches"][0]) for p in placed]
    assert len(set(tiles)) >= 3 and max(tiles) == MAX_TILES + 1, tiles  # thumbnail beside 4
    pixels = np.concatenate([p.arrays["pixel_values"] for p in placed])
    np.testing.assert_array_equal(pixels, expected["pixel_values"])


def test_vision_half_gives_the_rows_the_processor_counted(internvl3: str) -> None:
    images = _images()
    text = _prompt(internvl3, len(images))
    _, placed = checkpoint_spec(internvl3).image_processor(internvl3).process(text, images)
    ours = load_model(internvl3, torch.float32, torch.device("cpu"))
    # The step's images batched as the worker batches them: arrays concatenated image by image.
    batch = {
        name: torch.cat([torch.from_numpy(np.array(p.arrays[name])) for p in placed])
        for name in ("pixel_values", "num_patches")
    }
    with torch.no_grad():
        features = ours.vision(batch)
    theirs = transformers.InternVLForConditionalGeneration.from_pretrained(
        internvl3, dtype=torch.float32
    ).eval()
    for i, (p, rows) in enumerate(zip(placed, features, strict=True)):
        assert rows.shape[0] == p.length, f"image {i}: {rows.shape[0]} rows, {p.length} tokens"
        with torch.no_grad():
            pixels = torch.from_numpy(np.array(p.arrays["pixel_values"]))
            want = theirs.model.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(rows, want.flatten(0, 1), rtol=1e-5, atol=1e-5)


def test_both_weight_layouts_load_alike(internvl3: str, tmp_path) -> None:  # noqa: ANN001
    """The builder's files hold transformers 4's names (`language_model.model.`,
    `vision_tower.`, `multi_modal_projector.`); checkpoints saved as transformers 5 models
    name them `model.language_model.` etc. and may write a tied `lm_head.weight`: same model."""
    theirs = transformers.InternVLForConditionalGeneration.from_pretrained(
        internvl3, dtype=torch.float32
    )
    state = {k: v.detach().clone().contiguous() for k, v in theirs.state_dict().items()}
    assert {"lm_head.weight", "model.language_model.embed_tokens.weight"} <= set(state)
    for name in os.listdir(internvl3):
        if name != "model.safetensors":
            shutil.copy(os.path.join(internvl3, name), tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cpu = torch.device("cpu")
    # aten: oneDNN's packing would release the loaded values this compares
    ours = dict(load_model(internvl3, torch.float32, cpu, "aten").named_parameters())
    again = dict(load_model(str(tmp_path), torch.float32, cpu, "aten").named_parameters())
    # The written lm_head.weight is loaded as the output layer of its own (as transformers
    # does when a checkpoint carries one), equal to the embeddings it was tied to.
    head = again.pop("language.lm_head.weight")
    assert torch.equal(head, ours["language.model.embed_tokens.weight"])
    assert ours.keys() == again.keys()
    for name, value in ours.items():
        assert torch.equal(value, again[name]), name


def test_internvl3_5_tp2_chunks_and_prefix_cache_cut_through_tiles(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("internvl3_5")
    model_dir = build_internvl(str(root / "ckpt"), text_arch="qwen3")
    wide, tall = _images()[1], _images()[2]
    red, blue = Image.new("RGB", (90, 50), (220, 20, 20)), Image.new("RGB", (90, 50), (20, 20, 220))
    one = lambda img: ([  # noqa: E731
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMG"}},
                                     {"type": "text", "text": "describe it"}]}
    ], [img])  # fmt: skip
    two = ([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "IMG"}}, {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": "IMG"}}]}], [wide, tall])  # fmt: skip
    chats = [one(red), one(blue), two, ([{"role": "user", "content": "just text"}], [])]
    ref = VLMReference(model_dir)
    expected = [ref.greedy(messages, images, MAX_NEW) for messages, images in chats]
    texts = [ref.text(tokens) for _, tokens in expected]
    del ref
    # Same size, same prompt tokens: only the pixels differ, and so must the answers, or a
    # prefix cache keyed on tokens alone would pass.
    assert expected[0][1] != expected[1][1], "red and blue answer alike: no content check"
    # --tp 2 (gloo): each rank runs the replicated vision tower on the step's tiles.
    config = local_config(
        model_dir, str(root), tp=2, max_batched_tokens=7, max_batch_size=4, block_size=4,
        num_kv_blocks=256,
    )  # fmt: skip

    async def ask(url: str, order: list[int]) -> dict[int, object]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        try:
            jobs = [
                client.chat.completions.create(
                    model="ckpt",
                    messages=with_images_in_order(*chats[i]),
                    max_tokens=MAX_NEW,
                    temperature=0,
                )  # fmt: skip
                for i in order
            ]
            return dict(zip(order, await asyncio.gather(*jobs), strict=True))
        finally:
            await client.close()

    with server(config, os.path.join(str(root), "server.log")) as srv:
        rounds = {"first": asyncio.run(ask(srv["url"], [0, 2, 3]))}
        # Blue after red has cached red's blocks: its image rows must not come from them.
        rounds["blue after red"] = asyncio.run(ask(srv["url"], [1]))
        rounds["cached"] = asyncio.run(ask(srv["url"], [0, 1, 2, 3]))
        hits = wait_for(
            lambda: metrics(srv["url"]).get("vlmserve:prefix_cache_hits_total", 0),
            10,
            "prefix cache hits",
        )
        # A placeholder typed into the text leaves one image with two places: a 400 naming
        # the messages, and the server goes on serving.
        typed = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(red)}},
            {"type": "text", "text": "is <IMG_CONTEXT> here"}]}]  # fmt: skip
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="ckpt", messages=typed, max_tokens=2)
        assert err.value.body["param"] == "messages", err.value.body
        after = client.chat.completions.create(
            model="ckpt",
            messages=with_images_in_order(*chats[0]),
            max_tokens=MAX_NEW,
            temperature=0,
        )
        assert after.choices[0].message.content == texts[0]
    assert hits > 0
    assert_served_like_transformers(rounds, expected, texts, [len(c[1]) for c in chats])
