"""Gemma 3 (`Gemma3ForConditionalGeneration`, `Gemma3ForCausalLM`) against transformers.

The demo checkpoints (workers/demo_gemma3.py) have a 32-token sliding window in their local
layers, a global layer with linearly scaled RoPE, Gemma's (1 + w) norms, soft-capped logits and
16 soft tokens per image, whose tokens attend to each other both ways. Through the real
server, 8 requests in flight (one image, two images, text only, prompts several windows long
with and without images, a multi-turn chat) must give transformers' greedy tokens with exact
`usage.prompt_tokens`, with 11-token steps (shorter than an image: the scheduler moves a chunk
end out of an image, past the budget when the image starts the chunk) and 4-token blocks (cached
prefixes that end inside images), twice (encoder and prefix caches the second time). The
text-only model serves long prompts token-identical too, in one step and in small chunks.
"""

from __future__ import annotations

import os

import numpy as np
import openai
import pytest
import torch
import transformers
from hf_reference import hf_greedy
from PIL import Image
from server_fixtures import local_config
from vlm_reference import (
    VLMReference,
    assert_served_like_transformers,
    greedy_chats,
    template_messages,
    user_turn,
    with_image_urls,
)

from vlmserve.deploy.launcher import server
from vlmserve.scheduler.scheduler import Scheduler
from vlmserve.shared.messages import ImageMeta, SamplingParams, StepResult, Submit
from vlmserve.shared.models import checkpoint_spec
from vlmserve.shared.models.processing import tokenize_rendered
from vlmserve.workers import demo_checkpoint
from vlmserve.workers.demo_gemma3 import SOFT_TOKENS, WINDOW, build_gemma3

MAX_NEW = 12
LONG = (
    "Tell me a long story about a small boat that sails across the wide grey sea at night, "
    "past seven islands and three lighthouses, while the wind keeps changing its mind and the "
    "stars come out one by one over the quiet water, and then say what the sailor saw."
)


def make_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)),
        Image.new("RGB", (70, 30), (10, 200, 30)),
        Image.linear_gradient("L").resize((24, 56)).convert("RGB"),
        Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).rotate(180),
    ]


TWO = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "IMG0"}},
    {"type": "text", "text": "compare these"},
    {"type": "image_url", "image_url": {"url": "IMG2"}},
]}]  # fmt: skip
LONG_THEN_IMAGE = [{"role": "user", "content": [
    {"type": "text", "text": LONG},
    {"type": "image_url", "image_url": {"url": "IMG1"}},
    {"type": "text", "text": LONG},
]}]  # fmt: skip
CHATS = [  # (messages, indices of the images they show)
    (user_turn(0, "describe"), [0]),
    (TWO, [0, 2]),
    ([{"role": "user", "content": "no picture here, just words"}], []),
    ([{"role": "user", "content": LONG}], []),
    (LONG_THEN_IMAGE, [1]),
    (user_turn(3, "describe"), [3]),  # chat 0's token ids, other pixels
    (
        [
            {"role": "system", "content": "be brief"},
            *user_turn(2, "what is it"),
            {"role": "assistant", "content": "a gradient"},
            {"role": "user", "content": LONG},
        ],
        [2],
    ),
    (TWO, [0, 2]),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_gemma3(str(tmp_path_factory.mktemp("gemma3") / "ckpt"))


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Built as `vlmserve demo-checkpoint DIR --arch gemma3_text` builds it."""
    out = str(tmp_path_factory.mktemp("gemma3-text") / "ckpt")
    demo_checkpoint.main([out, "--arch", "gemma3_text"])
    assert checkpoint_spec(out).architectures == ("Gemma3ForCausalLM",)
    return out


def test_prompt_and_pixels_as_transformers_processor(checkpoint: str) -> None:
    """Our token ids and pixels are Gemma3Processor's; each image is placed on the run of soft
    tokens its token_type_ids mark (not <start_of_image>/<end_of_image> around it)."""
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    ours = checkpoint_spec(checkpoint).image_processor(checkpoint)
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
        assert ids.count(processor.tokenizer.bos_token_id) == 1, "one BOS"
        marked = np.flatnonzero(theirs["token_type_ids"][0]).tolist()
        spans = [i for p in placed for i in range(p.offset, p.offset + p.length)]
        assert spans == marked and all(p.length == SOFT_TOKENS for p in placed)
        for i, p in enumerate(placed):
            np.testing.assert_array_equal(p.arrays["pixel_values"][0], theirs["pixel_values"][i])


def test_model_info_of_the_published_gemma_3_4b_it() -> None:
    """gemma-3-4b-it's published files: eos from generation_config.json (<eos> and
    <end_of_turn>), transformers' default context (config.json names none; its window does not
    shorten a session), images both ways."""
    real = os.path.join(os.path.dirname(__file__), "data", "realconfigs", "google__gemma-3-4b-it")
    spec = checkpoint_spec(real)
    info = spec.model_info(real)
    assert info.architecture == "Gemma3ForConditionalGeneration" and spec.bidirectional_images
    assert info.eos_token_ids == [1, 106] and info.max_position_embeddings == 131072


def test_typed_image_markers_are_refused(checkpoint: str) -> None:
    """A <start_of_image> typed into the text (placeholders that do not pair with the images)
    is a ValueError, which the frontend answers with a 400 naming `messages`."""
    ours = checkpoint_spec(checkpoint).image_processor(checkpoint)
    image = make_images()[0]
    for text, images in (("<start_of_image> and <start_of_image>", [image]), ("none", [image])):
        with pytest.raises(ValueError, match="placeholders for"):
            ours.process(text, images)


def test_chunks_never_end_inside_an_image() -> None:
    """With `bidirectional_images`, a chunk that would end inside an image ends at its start,
    and one that starts there runs on to its end, past the 8-token budget; without it, plain
    8-token chunks."""

    def chunks(bidirectional: bool) -> list[int]:
        s = Scheduler(
            num_blocks=64, block_size=4, max_batch_size=4, max_batched_tokens=8,
            session_len=1000, eos_token_ids=[1], bidirectional_images=bidirectional,
        )  # fmt: skip
        image = ImageMeta("h", offset=5, length=16, arrays=[])
        s.add(Submit("a", "fe", list(range(10, 50)), SamplingParams(), images=[image]))
        sizes = []
        while (plan := s.schedule()) is not None and not plan.seqs[0].sample:
            sizes.append(plan.seqs[0].num_tokens)
            s.update(StepResult(step_id=plan.step_id, seq_ids=[], token_ids=[]))
        return [*sizes, plan.seqs[0].num_tokens]

    assert chunks(True) == [5, 16, 8, 8, 3]
    assert chunks(False) == [8, 8, 8, 8, 8]


def test_served_like_transformers(checkpoint: str, tmp_path_factory) -> None:  # noqa: ANN001
    ref = VLMReference(checkpoint)
    images = make_images()
    expected = [ref.greedy(msgs, [images[i] for i in idx], MAX_NEW) for msgs, idx in CHATS]
    texts = [ref.text(tokens) for _, tokens in expected]
    del ref
    # Several windows long, with and without an image; the same token ids with other pixels
    # answer otherwise (a prefix cache keyed on tokens alone would fail).
    assert expected[3][0] > 2 * WINDOW and expected[4][0] > 4 * WINDOW, expected
    assert expected[0][0] == expected[5][0] and expected[0][1] != expected[5][1]
    config = local_config(
        checkpoint, str(tmp_path_factory.mktemp("server")), max_batched_tokens=11,
        max_batch_size=8, block_size=4, num_kv_blocks=1024,
    )  # fmt: skip
    chats = [with_image_urls(msgs, make_images(), None) for msgs, _ in CHATS]
    with server(config, os.path.join(config.ipc_dir, "server.log")) as srv:
        first = greedy_chats(srv["url"], chats, MAX_NEW)
        again = greedy_chats(srv["url"], chats, MAX_NEW)  # encoder cache, prefixes mid-image
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        typed = user_turn(0, "is <start_of_image> here")
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="ckpt", messages=with_image_urls(typed, make_images(), None), max_tokens=2
            )
        assert err.value.body["param"] == "messages", err.value.body
    assert_served_like_transformers(
        {"first": first, "cached": again}, expected, texts, [len(idx) for _, idx in CHATS]
    )


def test_text_only_served_like_transformers(
    text_checkpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Gemma3ForCausalLM: prompts up to several windows long, in 7-token chunks beside each
    other's decodes (a whole prefill is test_text_decoder_logits_equal_transformers)."""
    tok = transformers.AutoTokenizer.from_pretrained(text_checkpoint)
    chats = [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": LONG}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": LONG + LONG}],
    ]
    prompts = [
        tokenize_rendered(
            tok, tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        )
        for c in chats
    ]
    assert len(prompts[2]) > 4 * WINDOW
    expected = hf_greedy(text_checkpoint, prompts, MAX_NEW)
    config = local_config(
        text_checkpoint, str(tmp_path_factory.mktemp("server")), max_batched_tokens=7,
        max_batch_size=4, block_size=4, num_kv_blocks=1024,
    )  # fmt: skip
    with server(config, os.path.join(config.ipc_dir, "server.log")) as srv:
        replies = greedy_chats(srv["url"], chats, MAX_NEW)
    for i, (reply, prompt, (tokens, _)) in enumerate(zip(replies, prompts, expected, strict=True)):
        assert reply.usage.prompt_tokens == len(prompt), f"chat {i}: prompt tokens"
        text = tok.decode(tokens, skip_special_tokens=True)
        assert reply.choices[0].message.content == text, (
            f"chat {i}: differs from transformers' greedy tokens {tokens}"
        )
        assert reply.usage.completion_tokens == len(tokens), f"chat {i}"


def test_text_decoder_logits_equal_transformers(text_checkpoint: str) -> None:
    """In-process: one 100-token prefill (three windows) through our paged Gemma 3 decoder
    gives transformers' logits (soft-capped), at both attention backends."""
    from vlmserve.workers.attention.context import step_context
    from vlmserve.workers.attention.metadata import build_metadata
    from vlmserve.workers.attention.registry import BACKENDS
    from vlmserve.workers.kv_pool import KVPool
    from vlmserve.workers.loader import load_model

    cpu = torch.device("cpu")
    ours = load_model(text_checkpoint, torch.float32, cpu)
    ids = torch.tensor(np.random.default_rng(0).integers(10, 500, 100))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(text_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        expected = theirs(ids[None]).logits[0]
    for name, backend_cls in BACKENDS.items():
        backend = backend_cls(KVPool.for_model(ours, 16, 16, torch.float32, cpu))
        metadata = build_metadata([0], [len(ids)], [list(range(16))], 16, cpu)
        with torch.no_grad(), step_context(metadata, backend):
            logits = ours.compute_logits(ours(ids, metadata.positions))
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=name)


def test_tp2_served_like_transformers(checkpoint: str, tmp_path_factory) -> None:  # noqa: ANN001
    """At --tp 2 (gloo; 2 query heads and 1 KV head per rank, the vocabulary split): a prompt
    of several windows with an image and one of text only, in 11-token steps, give
    transformers' greedy tokens."""
    chats = [CHATS[4], CHATS[3]]
    ref = VLMReference(checkpoint)
    expected = [ref.greedy(msgs, [make_images()[i] for i in idx], MAX_NEW) for msgs, idx in chats]
    texts = [ref.text(tokens) for _, tokens in expected]
    del ref
    config = local_config(
        checkpoint, str(tmp_path_factory.mktemp("tp2")), tp=2, max_batched_tokens=11,
        max_batch_size=4, block_size=4, num_kv_blocks=512,
    )  # fmt: skip
    with server(config, os.path.join(config.ipc_dir, "server.log")) as srv:
        replies = greedy_chats(
            srv["url"], [with_image_urls(m, make_images(), None) for m, _ in chats], MAX_NEW
        )
    for i, (reply, (prompt_len, tokens)) in enumerate(zip(replies, expected, strict=True)):
        assert reply.usage.prompt_tokens == prompt_len, f"chat {i}: prompt tokens"
        assert reply.choices[0].message.content == texts[i], f"chat {i}: transformers' {tokens}"


def test_what_we_do_not_compute_is_refused_at_start(checkpoint: str, tmp_path) -> None:  # noqa: ANN001
    """Attention logit soft-capping (Gemma 2's; Gemma 3 sets none) and an image longer than the
    sliding window (where transformers' masks and ours would part) are refused by
    `serve api_server` in one line; the spec's and the model's both-ways flags agree."""
    import json
    import shutil
    import subprocess
    import sys

    from vlmserve.workers.models.registry import build_model

    spec = checkpoint_spec(checkpoint)
    with torch.device("meta"):
        model = build_model(spec, spec.hf_config(checkpoint))
    assert spec.bidirectional_images and model.bidirectional_images
    for name, change, words in (
        ("softcap", {"attn_logit_softcapping": 50.0}, "soft-capping is not supported"),
        ("window", {"sliding_window": SOFT_TOKENS - 1}, "longer than sliding_window"),
    ):
        bad = str(tmp_path / name)
        shutil.copytree(checkpoint, bad)
        with open(os.path.join(bad, "config.json")) as f:
            config = json.load(f)
        config["text_config"] |= change
        with open(os.path.join(bad, "config.json"), "w") as f:
            json.dump(config, f)
        out = subprocess.run(
            [sys.executable, "-m", "vlmserve", "serve", "api_server", bad],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        lines = out.stderr.strip().splitlines()
        assert out.returncode != 0 and len(lines) == 1, out.stderr
        assert words in lines[0], lines[0]
