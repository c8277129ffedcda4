"""Sliding-window attention in the engine against transformers: prompts 3-6x the window.

Tiny checkpoints from real published configs with the window shrunk to 16 tokens: Mistral
(the window in every layer) and Qwen2.5 with use_sliding_window (per-layer `layer_types`: the
layers from max_window_layers on slide, the first attends to everything). Greedy tokens
must equal `generate`'s (float32, CPU) at both attention backends: prompts shorter and longer
than the window decoded past it, fresh prefills in one step and chunked over several, beside
decodes, and a second round of the same prompts that starts from their cached prefixes.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
import transformers
from hf_reference import compare_greedy, hf_greedy

from vlmserve.deploy.launcher import scheduler_and_workers
from vlmserve.frontend.offline import run_requests
from vlmserve.shared.messages import SamplingParams
from vlmserve.shared.models import checkpoint_spec
from vlmserve.workers.demo_real import build_from_config

REALCONFIGS = os.path.join(os.path.dirname(__file__), "data", "realconfigs")
WINDOW = 16
PROMPT_LENS = [5, 12, 20, 48, 64, 100]  # the window is 16
MAX_NEW = 24
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
# Mistral: the window in every layer. Qwen2.5: use_sliding_window from layer 1 on.
CONFIGS = {
    "mistral": ("mistralai__Mistral-7B-Instruct-v0.3", {"sliding_window": WINDOW}),
    "qwen2": (
        "Qwen__Qwen2.5-7B-Instruct",
        {"sliding_window": WINDOW, "use_sliding_window": True, "max_window_layers": 1},
    ),
}
# Steps of 40 tokens: the first takes the prompts of 5, 12 and 20 whole (20: a fresh prefill
# longer than the window) and chunks the longer ones over the following steps, beside decodes.
STEP_TOKENS = 40


def build(name: str, root: str) -> str:
    folder, changes = CONFIGS[name]
    published = os.path.join(root, f"{name}-published")
    shutil.copytree(os.path.join(REALCONFIGS, folder), published)
    path = os.path.join(published, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(config | changes, f)
    return build_from_config(published, os.path.join(root, name))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, list, list]]:
    """Per config: the checkpoint, its prompts and transformers' greedy answers to them."""
    root = str(tmp_path_factory.mktemp("window"))
    out = {}
    for seed, name in enumerate(CONFIGS):
        model_dir = build(name, root)
        rng = random.Random(seed)
        prompts = [[rng.randrange(3, 600) for _ in range(n)] for n in PROMPT_LENS]
        out[name] = (model_dir, prompts, hf_greedy(model_dir, prompts, MAX_NEW))
    return out


def test_transformers_applies_the_window(models: dict) -> None:
    """The comparison means something: transformers' model honours the window (its logits
    over a prompt longer than the window change when the window is lifted), the same way
    in its sdpa and eager attention, and the engine is told each layer's window."""
    from vlmserve.workers.loader import load_model

    model_dir, prompts, _ = models["mistral"]
    ids = torch.tensor([prompts[-1]])
    logits = {}
    for attn in ("sdpa", "eager"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attn
        )
        with torch.no_grad():
            logits[attn] = model(ids).logits[0]
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-4)
    model.config.sliding_window = None
    with torch.no_grad():
        unwindowed = model(ids).logits[0]
    torch.testing.assert_close(unwindowed[:WINDOW], logits["eager"][:WINDOW])
    assert (unwindowed[WINDOW:] - logits["eager"][WINDOW:]).abs().amax() > 1e-2
    for name, expected in (("mistral", [WINDOW, WINDOW]), ("qwen2", [None, WINDOW])):
        ours = load_model(models[name][0], torch.float32, torch.device("cpu"))
        windows = [layer.self_attn.attn.sliding_window for layer in ours.model.layers]
        assert windows == expected, name
        info = checkpoint_spec(models[name][0]).model_info(models[name][0])
        assert info.max_position_embeddings > 1000, "the session is no longer capped"


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers_past_the_window(
    models: dict, workdir: str, name: str, backend: str
) -> None:
    model_dir, prompts, refs = models[name]
    settings = dict(
        attention_backend=backend,
        block_size=4,
        num_kv_blocks=256,
        max_batch_size=8,
        max_batched_tokens=STEP_TOKENS,
    )
    with scheduler_and_workers(model_dir, workdir, **settings) as eng:
        rounds = [run_requests(eng["config"], [(p, GREEDY) for p in prompts])[0]]
        rounds.append(run_requests(eng["config"], [(p, GREEDY) for p in prompts])[0])
    for number, results in enumerate(rounds):
        for prompt, res, (ref_tokens, ref_logits) in zip(prompts, results, refs, strict=True):
            label = f"{name}/{backend} round {number} prompt of {len(prompt)}"
            assert res.error is None, f"{label}: {res.error}"
            compare_greedy(label, res.token_ids, ref_tokens, ref_logits)
    cached = [res.num_cached_tokens for res in rounds[1]]
    assert cached[-1] >= 96, f"the second round starts from cached prefixes: {cached}"
