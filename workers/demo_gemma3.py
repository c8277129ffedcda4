"""Tiny random-weight Gemma 3 checkpoints in Hugging Face format, built offline.

`build_gemma3`: `Gemma3ForConditionalGeneration` (the layout of google/gemma-3-4b-it): a tiny
SigLIP tower over 32-pixel images (4-pixel patches), the projector pooling its 8 x 8 patches to
16 soft tokens per image, and a Gemma 3 decoder of three layers (sliding, global, sliding) with
head_dim 32, a 32-token sliding window (test prompts run past it), a local RoPE base and a
linearly scaled global one, query_pre_attn_scalar unlike head_dim and soft-capped final logits.
`build_gemma3_text`: the same decoder alone as `Gemma3ForCausalLM` (model_type gemma3_text, as
gemma-3-1b-it). Both with Gemma's special tokens and a Gemma-style chat template; the processor
writes each image as `\\n\\n<start_of_image>` + 16 `<image_soft_token>` + `<end_of_image>\\n\\n`.
"""

from __future__ import annotations

import json
import os

import torch
import transformers

from vlmserve.workers.demo_checkpoint import fast_tokenizer

IMAGE_SIZE, PATCH, SOFT_TOKENS, WINDOW = 32, 4, 16, 32
SPECIAL = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]  # fmt: skip
# Gemma 3's format, shortened: BOS, a system prompt folded into the first user turn, turns
# as <start_of_turn>user|model ... <end_of_turn>, images as <start_of_image> where they are.
TEMPLATE = (
    "{{ bos_token }}{% set prefix = '' %}{% set msgs = messages %}"
    "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% endif %}"
    "{% for m in msgs %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if loop.first %}{{ prefix }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] | trim }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] | trim }}"
    "{% elif p['type'] in ['image', 'image_url'] %}<start_of_image>{% endif %}{% endfor %}"
    "{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
EXTRA_SPECIAL = {
    "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}  # fmt: skip
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def _tokenizer(seed: int) -> transformers.PreTrainedTokenizerFast:
    tok = fast_tokenizer(512, SPECIAL, "<bos>", "<eos>", seed)
    tok.chat_template = TEMPLATE
    return tok


def _text_config(tok: transformers.PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        max_position_embeddings=8192, rms_norm_eps=1e-6, sliding_window=WINDOW,
        layer_types=LAYER_TYPES, final_logit_softcapping=30.0, initializer_range=0.2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip


def _save(model: torch.nn.Module, tok: transformers.PreTrainedTokenizerFast, out_dir: str) -> None:
    # Weights wider than the default initializer (and the (1 + w) norms off 1), so that
    # greedy choices are clear rather than near-ties.
    # The sublayers' output norms are drawn large, so that what the layers compute outweighs
    # the (tied) embedding of the last token, which would otherwise repeat itself.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "post_attention_layernorm" in name or "post_feedforward_layernorm" in name:
                p.normal_(5, 1.0)
            elif "mm_input_projection" in name:
                p.normal_(0, 1.0)
            elif "norm" in name:
                p.normal_(0, 0.3)
    os.makedirs(out_dir, exist_ok=True)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    # The names Gemma3Processor reads, as gemma-3's tokenizer_config.json gives them.
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["extra_special_tokens"] = EXTRA_SPECIAL
    with open(path, "w") as f:
        json.dump(saved | EXTRA_SPECIAL, f, indent=2)


def build_gemma3_text(out_dir: str, seed: int = 0) -> str:
    tok = _tokenizer(seed)
    config = transformers.Gemma3TextConfig(**_text_config(tok))
    torch.manual_seed(seed)
    _save(transformers.Gemma3ForCausalLM(config).eval(), tok, out_dir)
    return out_dir


def build_gemma3(out_dir: str, seed: int = 0) -> str:
    tok = _tokenizer(seed)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False, initializer_range=0.2,
        model_type="siglip_vision_model",
    )  # fmt: skip
    config = transformers.Gemma3Config(
        text_config=_text_config(tok),
        vision_config=vision,
        mm_tokens_per_image=SOFT_TOKENS,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    _save(transformers.Gemma3ForConditionalGeneration(config).eval(), tok, out_dir)
    transformers.Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out_dir)  # fmt: skip
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump({"image_seq_length": SOFT_TOKENS, "processor_class": "Gemma3Processor"}, f)
    return out_dir
