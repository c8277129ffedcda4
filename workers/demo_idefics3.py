"""Tiny random-weight Idefics3 (`Idefics3ForConditionalGeneration`) and SmolVLM
(`SmolVLMForConditionalGeneration`) checkpoints in Hugging Face format, built offline: a
SigLIP-style tower on 32-pixel frames of 4-pixel patches, a pixel shuffle of 2 (16 `<image>`
tokens a frame), a Llama decoder, the image processor that splits an image into up to 3x3
(Idefics3) or 2x2 (SmolVLM) sub-images plus the global one, and the chat format of the
published checkpoints (one that also takes plain-string contents)."""

from __future__ import annotations

import json
import os

import torch
import transformers

from vlmserve.workers.demo_checkpoint import fast_tokenizer
from vlmserve.workers.demo_vlm import TEXT

IDEFICS3_ARCHES = ("idefics3", "smolvlm")  # demo-checkpoint --arch names
FRAME, PATCH, SCALE = 32, 4, 2
SEQ_LEN = (FRAME // PATCH) ** 2 // SCALE**2  # <image> tokens per frame
IMAGE_TOKENS = [
    "<fake_token_around_image>", "<image>", "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
]  # fmt: skip
# The published format (User:/Assistant: turns ending in <end_of_utterance>), where a
# content may be a plain string too.
TEMPLATE = (
    "{{ bos }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}"
    "{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_idefics3(out_dir: str, smolvlm: bool = False, seed: int = 0) -> str:
    """Idefics3: a Llama-3-like tokenizer that adds its BOS; SmolVLM: a template that writes
    `<|im_start|>` and a tokenizer that adds none, as the published ones do."""
    if smolvlm:
        special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>"]
        tokenizer = fast_tokenizer(512, special, None, "<end_of_utterance>", seed)
        template = TEMPLATE.replace("{{ bos }}", "<|im_start|>")
    else:
        special = ["<|end_of_text|>", "<|begin_of_text|>", "<end_of_utterance>"]
        tokenizer = fast_tokenizer(512, special, "<|begin_of_text|>", "<end_of_utterance>", seed)
        template = TEMPLATE.replace("{{ bos }}", "")
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    kind = "SmolVLM" if smolvlm else "Idefics3"
    text = dict(
        **TEXT, vocab_size=len(tokenizer), rms_norm_eps=1e-5, rope_theta=100000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=FRAME, patch_size=PATCH, initializer_range=0.2,
    )  # fmt: skip
    config = getattr(transformers, f"{kind}Config")(
        text_config=text,
        vision_config=vision,
        scale_factor=SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(config).eval()
    images = getattr(transformers, f"{kind}ImageProcessorPil")(
        size={"longest_edge": (2 if smolvlm else 3) * FRAME},
        max_image_size={"longest_edge": FRAME},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    images.save_pretrained(out_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump({"image_seq_len": SEQ_LEN, "processor_class": f"{kind}Processor"}, f)
    return out_dir
