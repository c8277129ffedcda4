"""tie_word_embeddings against what the checkpoint holds, decided once in the loader
(`tie_as_checkpoint` in workers/loader.py) the way transformers decides it when it loads:

- tied in config.json but an lm_head of its own in the checkpoint: transformers unties and uses
  it, so the engine must too (tied, the embeddings and the lm_head overwrote each other);
- untied but no lm_head in the checkpoint: transformers draws a random output layer (reported
  MISSING), so the engine refuses the checkpoint with a line saying why.

One text family (Qwen2), one vision-language family (InternVL) and the published Mistral Small 3.1
config (tests/data/realconfigs) for the first trap, greedy tokens identical to transformers
`generate`; Llama and LLaVA for the second."""

from __future__ import annotations

import os
import random

import pytest
import torch
import transformers
from hf_reference import compare_greedy, hf_greedy
from safetensors.torch import load_file, save_file
from server_fixtures import engine_greedy

from vlmserve.workers.demo_checkpoint import build_checkpoint
from vlmserve.workers.demo_internvl import build_internvl
from vlmserve.workers.demo_real import build_from_config
from vlmserve.workers.demo_vlm import build_llava
from vlmserve.workers.loader import load_model

CPU = torch.device("cpu")
REALCONFIGS = os.path.join(os.path.dirname(__file__), "data", "realconfigs")
MISTRAL_SMALL = os.path.join(REALCONFIGS, "mistralai__Mistral-Small-3.1-24B-Instruct-2503")
MAX_NEW = 12


def _weights(model_dir: str) -> tuple[str, dict[str, torch.Tensor]]:
    path = os.path.join(model_dir, "model.safetensors")
    return path, load_file(path)


def _embed_name(weights: dict) -> str:
    (name,) = [k for k in weights if k.endswith("embed_tokens.weight")]
    return name


def _with_own_head(model_dir: str, name: str = "lm_head.weight") -> torch.Tensor:
    """Give a tied checkpoint an lm_head weight of its own (config.json still says tied), as
    Mistral Small 3.1's checkpoint has; returns it."""
    path, weights = _weights(model_dir)
    assert not any(k.endswith("lm_head.weight") for k in weights), "expected a tied checkpoint"
    embed = weights[_embed_name(weights)]
    head = torch.randn(embed.shape, generator=torch.Generator().manual_seed(7)) * 0.2
    weights[name] = head
    save_file(weights, path, metadata={"format": "pt"})
    return head


def _without_head(model_dir: str) -> None:
    path, weights = _weights(model_dir)
    (head,) = [k for k in weights if k.endswith("lm_head.weight")]
    del weights[head]
    save_file(weights, path, metadata={"format": "pt"})


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (5, 17, 40)]


def test_tied_config_with_own_lm_head_unties_like_transformers(tmp_path, workdir) -> None:  # noqa: ANN001
    model_dir = build_checkpoint(str(tmp_path / "qwen2"), arch="qwen2")
    head = _with_own_head(model_dir)
    ours = load_model(model_dir, torch.float32, CPU, "aten")  # aten: values stay loaded
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    torch.testing.assert_close(ours.lm_head.weight, head, rtol=0, atol=0)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert ref.config.tie_word_embeddings, "config.json must still say tied"
    assert ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr()
    prompts = _prompts(ref.config.vocab_size)
    refs = hf_greedy(model_dir, prompts, MAX_NEW)
    for i, (got, (tokens, logits)) in enumerate(
        zip(engine_greedy(model_dir, workdir, prompts, MAX_NEW), refs, strict=True)
    ):
        compare_greedy(f"qwen2 tied config with own lm_head, prompt {i}", got, tokens, logits)


def test_vlm_tied_config_with_own_lm_head_unties_like_transformers(tmp_path, workdir) -> None:  # noqa: ANN001
    model_dir = build_internvl(str(tmp_path / "internvl"))
    head = _with_own_head(model_dir)
    ours = load_model(model_dir, torch.float32, CPU, "aten")  # aten: values stay loaded
    assert ours.language.lm_head.weight is not ours.language.model.embed_tokens.weight
    torch.testing.assert_close(ours.language.lm_head.weight, head, rtol=0, atol=0)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(model_dir)
    assert ref.config.tie_word_embeddings, "config.json must still say tied"
    assert ref.lm_head.weight.data_ptr() != ref.get_input_embeddings().weight.data_ptr()
    prompts = _prompts(ref.config.text_config.vocab_size)
    refs = hf_greedy(model_dir, prompts, MAX_NEW, auto=transformers.AutoModelForImageTextToText)
    for i, (got, (tokens, logits)) in enumerate(
        zip(engine_greedy(model_dir, workdir, prompts, MAX_NEW), refs, strict=True)
    ):
        compare_greedy(f"internvl tied config with own lm_head, prompt {i}", got, tokens, logits)


def test_mistral_small_config_without_tie_key_unties_like_transformers(tmp_path, workdir) -> None:  # noqa: ANN001
    """The published Mistral Small 3.1 config.json does not say tie_word_embeddings (transformers
    5 reads True) and its checkpoint holds language_model.lm_head.weight: shrunk, with such a
    head, greedy tokens identical to transformers, which unties."""
    with open(os.path.join(MISTRAL_SMALL, "config.json")) as f:
        assert "tie_word_embeddings" not in f.read()
    model_dir = build_from_config(MISTRAL_SMALL, str(tmp_path / "mistral3"))
    head = _with_own_head(model_dir, "language_model.lm_head.weight")
    ours = load_model(model_dir, torch.float32, CPU, "aten")  # aten: values stay loaded
    assert ours.language.lm_head.weight is not ours.language.model.embed_tokens.weight
    torch.testing.assert_close(ours.language.lm_head.weight, head, rtol=0, atol=0)
    auto = transformers.AutoModelForImageTextToText
    ref = auto.from_pretrained(model_dir)
    assert ref.config.tie_word_embeddings
    assert ref.lm_head.weight.data_ptr() != ref.get_input_embeddings().weight.data_ptr()
    prompts = _prompts(ref.config.text_config.vocab_size)
    refs = hf_greedy(model_dir, prompts, MAX_NEW, auto=auto)
    for i, (got, (tokens, logits)) in enumerate(
        zip(engine_greedy(model_dir, workdir, prompts, MAX_NEW), refs, strict=True)
    ):
        compare_greedy(
            f"Mistral Small 3.1 config with own lm_head, prompt {i}", got, tokens, logits
        )


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_untied_config_without_lm_head_is_refused(family: str, tmp_path) -> None:  # noqa: ANN001
    if family == "llama":
        model_dir = build_checkpoint(str(tmp_path / family), arch="llama")
        auto = transformers.AutoModelForCausalLM
    else:
        model_dir = build_llava(str(tmp_path / family))
        auto = transformers.AutoModelForImageTextToText
    _without_head(model_dir)
    _, info = auto.from_pretrained(model_dir, output_loading_info=True)
    assert any(k.endswith("lm_head.weight") for k in info["missing_keys"]), info
    with pytest.raises(ValueError, match="no lm_head weight and config.json says tie_word_"):
        load_model(model_dir, torch.float32, CPU)
