"""Real published checkpoint configurations (tests/data/realconfigs, SOURCES.md there says where
each file came from), shrunk to tiny random-weight checkpoints by workers/demo_real.py: every
supported one serves greedy chats token-identical to transformers on the same files, with exact
usage; every unsupported one is refused at start-up with one line naming the architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import openai
import pytest
import torch
import transformers
from hf_reference import compare_greedy, hf_greedy
from PIL import Image
from server_fixtures import engine_greedy, local_config
from vlm_reference import VLMReference, template_messages, with_images_in_order

from vlmserve.deploy.launcher import server
from vlmserve.shared.models import checkpoint_spec, supported_architectures
from vlmserve.shared.models.processing import (
    needs_special_tokens,
    processor_chat_template,
    tokenize_rendered,
)
from vlmserve.shared.models.spec import as_list
from vlmserve.workers.demo_real import build_from_config

CORPUS = os.path.join(os.path.dirname(__file__), "data", "realconfigs")
MAX_NEW = 8


def _servable(name: str) -> bool:
    try:
        checkpoint_spec(os.path.join(CORPUS, name))
        return True
    except ValueError:
        return False


def _architecture_supported(name: str) -> bool:
    config = json.load(open(os.path.join(CORPUS, name, "config.json")))
    return config["architectures"][0] in supported_architectures()


TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _config_only(name: str) -> bool:
    """A vision checkpoint found without any of its tokenizer files (Mistral Small 3.1): no chat
    can be rendered nor image placed without its special tokens."""
    config = json.load(open(os.path.join(CORPUS, name, "config.json")))
    found = any(os.path.exists(os.path.join(CORPUS, name, f)) for f in TOKENIZER_FILES)
    return "vision_config" in config and not found


FOLDERS = sorted(d for d in os.listdir(CORPUS) if os.path.isdir(os.path.join(CORPUS, d)))
CONFIG_ONLY = [d for d in FOLDERS if _architecture_supported(d) and _config_only(d)]
# Shrunk checkpoints hold plain float weights, so a quantized one is served in its float form;
# as published, it is refused like an unsupported architecture.
SUPPORTED = [d for d in FOLDERS if _architecture_supported(d) and d not in CONFIG_ONLY]
REFUSED = [d for d in FOLDERS if not _servable(d)]


def _images() -> list[Image.Image]:
    noise = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    return [Image.fromarray(noise), Image.new("RGB", (50, 30), (200, 40, 90))]


def _chats(vision: bool) -> list[tuple[list[dict], int]]:
    """(messages, how many of the test images they show)."""
    text = [{"role": "user", "content": "Say something about the weather"}]
    if not vision:
        return [(text, 0), ([{"role": "user", "content": "hi"}], 0)]
    one = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "IMG"}},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMG"}},
                                        {"type": "image_url", "image_url": {"url": "IMG"}},
                                        {"type": "text", "text": "Compare them"}]}]  # fmt: skip
    return [(text, 0), (one, 1), (two, 2)]


def _rendered(tok: object, messages: list[dict]) -> str:
    """The prompt text of a chat; a checkpoint without a chat template (Vicuna) is asked
    through /v1/completions with the user's text as it is."""
    if tok.chat_template is None:
        return messages[-1]["content"]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _generation_config(model_dir: str) -> transformers.GenerationConfig:
    """The published generation config; with none published (a config folder found without
    one), the one transformers derives from config.json, as `generate` does."""
    try:
        return transformers.GenerationConfig.from_pretrained(model_dir)
    except OSError:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        return transformers.GenerationConfig.from_model_config(config)


def _text_reference(model_dir: str, chats: list) -> list[tuple[int, list[int], str]]:
    """transformers' greedy answer to each chat, prompted as the model's processor does."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for messages, _ in chats:
        text = _rendered(tok, messages)
        special = needs_special_tokens(tok, text)
        prompts.append(tok(text, add_special_tokens=special)["input_ids"])
    eos = set(as_list(_generation_config(model_dir).eos_token_id))
    out = []
    for prompt, (tokens, _) in zip(prompts, hf_greedy(model_dir, prompts, MAX_NEW), strict=True):
        text = tok.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
        out.append((len(prompt), tokens, text))
    return out


def _as_parts(messages: list[dict]) -> list[dict]:
    """String contents as one text part: the form processors' chat templates take (llava-hf's
    and SmolVLM2's render nothing of a string; the server sends strings as parts to those)."""
    return [
        m | {"content": [{"type": "text", "text": m["content"]}]}
        if isinstance(m["content"], str) else m
        for m in messages
    ]  # fmt: skip


def _vision_reference(model_dir: str, chats: list) -> list[tuple[int, list[int], str]]:
    ref = VLMReference(model_dir)
    images = _images()
    out = []
    for messages, count in chats:
        prompt_len, tokens = ref.greedy(_as_parts(messages), images[:count], MAX_NEW)
        out.append((prompt_len, tokens, ref.text(tokens)))
    return out


def _original_reference(model_dir: str, chats: list) -> list[tuple[int, list[int], str]]:
    """Original-format LLaVA: transformers cannot read it, so its twin in transformers' format
    (same weights, written by the builder to hf-twin/) runs `generate` on the prompts that the
    original format's own preprocessing (padding to a square or tiling, text tokenized around
    each image) gives; only the model side is independent here."""
    spec = checkpoint_spec(model_dir)
    processor = spec.image_processor(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    twin = transformers.AutoModelForImageTextToText.from_pretrained(
        os.path.join(model_dir, "hf-twin"), dtype=torch.float32
    ).eval()
    out = []
    for messages, count in chats:
        text = tok.apply_chat_template(
            template_messages(messages), chat_template=spec.chat_template(), tokenize=False,
            add_generation_prompt=True,
        )  # fmt: skip
        extra = {}
        if count:
            ids, placed = processor.process(text, _images()[:count])
            arrays = [torch.from_numpy(p.arrays["pixel_values"]) for p in placed]
            extra["pixel_values"] = torch.cat(arrays)
        else:
            ids = tokenize_rendered(tok, text)
        prompt = torch.tensor([ids])
        with torch.no_grad():
            gen = twin.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW,
                do_sample=False, **extra,
            )  # fmt: skip
        tokens = gen[0, len(ids) :].tolist()
        out.append((len(ids), tokens, tok.decode(tokens, skip_special_tokens=True)))
    return out


def _reference(model_dir: str, chats: list) -> list[tuple[int, list[int], str]]:
    spec = checkpoint_spec(model_dir)
    if spec.family == "llava_original":
        return _original_reference(model_dir, chats)
    if spec.image_processor(model_dir) is not None:
        return _vision_reference(model_dir, chats)
    return _text_reference(model_dir, chats)


@pytest.mark.parametrize("name", SUPPORTED)
def test_real_config_serves_like_transformers(name: str, tmp_path_factory) -> None:  # noqa: ANN001
    root = tmp_path_factory.mktemp(name[:40])
    model_dir = build_from_config(os.path.join(CORPUS, name), str(root / "ckpt"))
    chats = _chats(checkpoint_spec(model_dir).image_processor(model_dir) is not None)
    expected = _reference(model_dir, chats)
    template = transformers.AutoTokenizer.from_pretrained(model_dir).chat_template
    template = template or processor_chat_template(model_dir)  # SmolVLM2's chat_template.json
    has_template = (template or checkpoint_spec(model_dir).chat_template()) is not None
    config = local_config(model_dir, str(root), num_kv_blocks=512)
    with server(config, os.path.join(str(root), "server.log")) as srv:
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        for i, ((messages, count), (prompt_len, tokens, text)) in enumerate(
            zip(chats, expected, strict=True)
        ):
            label = f"{name} chat {i} ({count} images)"
            if has_template:
                reply = client.chat.completions.create(
                    model=model, messages=with_images_in_order(messages, _images()[:count]),
                    max_tokens=MAX_NEW, temperature=0,
                )  # fmt: skip
                answer = reply.choices[0].message.content
            else:
                reply = client.completions.create(
                    model=model, prompt=messages[-1]["content"], max_tokens=MAX_NEW,
                    temperature=0,
                )  # fmt: skip
                answer = reply.choices[0].text
            assert reply.usage.prompt_tokens == prompt_len, f"{label}: prompt tokens"
            assert answer == text, f"{label}: differs from transformers' greedy tokens {tokens}"
            assert reply.usage.completion_tokens == len(tokens), f"{label}: {tokens}"


@pytest.mark.parametrize("name", CONFIG_ONLY)
def test_config_only_real_config_decodes_like_transformers(name: str, tmp_path_factory) -> None:  # noqa: ANN001
    """Its published decoder settings (Mistral Small 3.1: rope_theta 1e9, no sliding window, no
    tie_word_embeddings key, 131072 tokens), shrunk: greedy tokens for token-id prompts through
    the scheduler and a worker, identical to transformers `generate`."""
    root = tmp_path_factory.mktemp(name[:40])
    model_dir = build_from_config(os.path.join(CORPUS, name), str(root / "ckpt"))
    vocab = transformers.AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, vocab, n).tolist() for n in (6, 23, 50)]
    auto = transformers.AutoModelForImageTextToText
    refs = hf_greedy(model_dir, prompts, MAX_NEW, auto=auto)
    got = engine_greedy(model_dir, str(root), prompts, MAX_NEW)
    for i, (ours, (tokens, logits)) in enumerate(zip(got, refs, strict=True)):
        compare_greedy(f"{name} prompt {i} ({len(prompts[i])} tokens)", ours, tokens, logits)


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_real_config_is_refused_at_start(name: str) -> None:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "vlmserve", "serve", "api_server", os.path.join(CORPUS, name)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    assert time.monotonic() - started < 30
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, f"{name}: expected one line, got:\n{out.stderr}"
    if _architecture_supported(name):  # a quantized checkpoint of a family we serve
        assert "quantized checkpoints" in lines[0] and "not supported" in lines[0], lines[0]
        return
    config = json.load(open(os.path.join(CORPUS, name, "config.json")))
    assert f"unsupported architecture {config['architectures'][0]!r}" in lines[0], lines[0]
    assert "supported: " in lines[0] and "LlavaForConditionalGeneration" in lines[0], lines[0]
