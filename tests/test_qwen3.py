"""Qwen3 and Qwen3-VL against transformers (float32, CPU).

The interleaved multimodal RoPE as a layer; plain Qwen3 (q/k norms, a head_dim of its own)
through the engine with chunked prefill; Qwen3-VL through the real server at --tp 2 with a
step budget so small that prefill chunks cut through images, where each chunk must add the
DeepStack levels of exactly the image tokens it holds, then again from the prefix cache. The 8
mixed requests every vision-language family answers (1 and 2 images, text only) are in
test_vlm.py, Qwen3-VL among them; its real published config is in test_real_configs.py.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import openai
import pytest
import torch
import transformers
from hf_reference import compare_greedy, hf_greedy
from PIL import Image
from server_fixtures import local_config
from vlm_reference import VLMReference, assert_served_like_transformers, with_images_in_order

from vlmserve.deploy.launcher import scheduler_and_workers, server
from vlmserve.frontend.offline import run_requests
from vlmserve.shared.messages import SamplingParams
from vlmserve.workers.demo_qwen3_vl import build_qwen3_vl
from vlmserve.workers.layers.rotary import RotaryEmbedding

MAX_NEW = 12


def test_interleaved_mrope_matches_transformers() -> None:
    """Qwen3-VL's sections [24, 20, 20] over 64 frequencies, interleaved t h w t h w ..."""
    rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
            "mrope_interleaved": True}  # fmt: skip
    config = transformers.Qwen3VLTextConfig(
        hidden_size=256, num_attention_heads=2, head_dim=128, rope_parameters=rope,
        max_position_embeddings=4096,
    )  # fmt: skip
    positions = torch.from_numpy(np.random.default_rng(0).integers(0, 4096, (3, 50)))
    cos, sin = RotaryEmbedding(config, 128, 4096)(positions, torch.float32)  # [50, 1, 128]
    theirs = transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding(config)
    their_cos, their_sin = theirs(torch.zeros(1), positions[:, None, :])  # [1, 50, 128]
    torch.testing.assert_close(cos[:, 0], their_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(sin[:, 0], their_sin[0], rtol=0, atol=0)


def test_qwen3_text_greedy_matches_transformers(checkpoints: dict, workdir: str) -> None:
    model_dir = checkpoints["qwen3"]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 500, n).tolist() for n in (4, 23, 70, 150)]
    refs = hf_greedy(model_dir, prompts, MAX_NEW)
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    # A 64-token step budget: the longer prompts are prefilled in chunks beside decodes.
    with scheduler_and_workers(model_dir, workdir, max_batched_tokens=64, max_batch_size=8) as eng:
        results, _ = run_requests(eng["config"], [(p, greedy) for p in prompts])
    for i, (res, (tokens, logits)) in enumerate(zip(results, refs, strict=True)):
        assert res.error is None, res.error
        compare_greedy(
            f"qwen3 request {i} ({len(prompts[i])} tokens)", res.token_ids, tokens, logits
        )


def _images() -> list[Image.Image]:
    noise = np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    return [Image.fromarray(noise), Image.linear_gradient("L").resize((70, 45)).convert("RGB")]


def _chats() -> list[tuple[list[dict], int]]:
    """(messages, how many of the test images they show, in order)."""
    image = {"type": "image_url", "image_url": {"url": "IMG"}}
    return [
        ([{"role": "user", "content": [image, {"type": "text", "text": "what is it"}]}], 1),
        ([{"role": "user", "content": [image, {"type": "text", "text": "and"}, image]}], 2),
        ([{"role": "user", "content": "only words this time"}], 0),
    ]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_qwen3_vl_tp2_prefill_chunks_through_images(
    tmp_path_factory: pytest.TempPathFactory, moe: bool
) -> None:
    """At --tp 2; with `moe`, Qwen3-VL-MoE: every expert's intermediate dimension split."""
    root = tmp_path_factory.mktemp("qwen3-vl-chunks")
    model_dir = build_qwen3_vl(str(root / "ckpt"), moe=moe)
    ref = VLMReference(model_dir)
    chats = _chats()
    expected = [ref.greedy(messages, _images()[:count], MAX_NEW) for messages, count in chats]
    texts = [ref.text(tokens) for _, tokens in expected]
    del ref
    # 7 tokens a step: every image (6 to 12 placeholders) is split between chunks, and the
    # three requests' chunks share steps; 4-token blocks put cached prefixes mid-image.
    config = local_config(
        model_dir, str(root), tp=2, max_batched_tokens=7, max_batch_size=4, block_size=4,
        num_kv_blocks=256,
    )  # fmt: skip

    async def ask_all(url: str) -> list:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        try:
            jobs = [
                client.chat.completions.create(
                    model="ckpt",
                    messages=with_images_in_order(messages, _images()),
                    max_tokens=MAX_NEW,
                    temperature=0,
                )  # fmt: skip
                for messages, _ in chats
            ]
            return await asyncio.gather(*jobs)
        finally:
            await client.close()

    with server(config, os.path.join(str(root), "server.log")) as srv:
        first = asyncio.run(ask_all(srv["url"]))
        again = asyncio.run(ask_all(srv["url"]))  # prefixes from the cache, cut mid-image
    assert_served_like_transformers(
        {"first": first, "cached": again}, expected, texts, [n for _, n in chats]
    )
