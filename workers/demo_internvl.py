"""A tiny random-weight InternVL3 / 3.5 checkpoint in Hugging Face format
(`InternVLForConditionalGeneration`, the `-hf` layout), built offline: transformers' InternViT
tower on 56-pixel tiles (4x4 patches of 14), pixel shuffle (4 embedding rows per tile), the MLP
projector, a Qwen2 (InternVL3) or Qwen3 (InternVL3.5) decoder, and its processor's files: dynamic
tiling into up to 4 tiles plus a thumbnail (GotOcr2 image processor), `<img>` + one
`<IMG_CONTEXT>` per embedding row + `</img>` per image, and a ChatML template that writes
`<IMG_CONTEXT>` where an image goes, as the published -hf checkpoints do."""

from __future__ import annotations

import json
import os

import torch
import transformers

from vlmserve.workers.demo_checkpoint import fast_tokenizer
from vlmserve.workers.demo_vlm import TEXT

TILE, PATCH = 56, 14
ROWS_PER_TILE = (TILE // PATCH) ** 2 // 4  # pixel shuffle at downsample_ratio 0.5
MAX_TILES = 4
# `demo-checkpoint --arch` names: InternVL3 has a Qwen2 decoder, InternVL3.5 a Qwen3 one.
INTERNVL_ARCHES = {"internvl": "qwen2", "internvl3_5": "qwen3"}

IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] in ['image', 'image_url'] %}<IMG_CONTEXT>{{ '\\n' }}"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_internvl(out_dir: str, seed: int = 0, text_arch: str = "qwen2") -> str:
    """InternVL3 (a Qwen2 decoder) or, with `text_arch` "qwen3", InternVL3.5; "llama" gives the
    Llama text config of -hf checkpoints converted from InternLM2 decoders."""
    tokenizer = fast_tokenizer(512, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None,
                               "<|im_end|>", seed)  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())})
    # Named, as InternVLProcessor reads them (tokenizer.context_image_token, ...) and as the
    # published tokenizer_config.json holds them: given when the tokenizer is loaded.
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        out_dir, extra_special_tokens=dict(IMAGE_TOKENS)
    )
    text = dict(
        **TEXT, vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=1000000.0,
        model_type=text_arch, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if text_arch == "qwen3":
        text["head_dim"] = 16
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=[TILE, TILE], patch_size=[PATCH, PATCH], initializer_range=0.2,
        layer_scale_init_value=1.0,  # real towers' 0.1 would all but hide the random layers
    )  # fmt: skip
    config = transformers.InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=ROWS_PER_TILE,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    # crop_to_patches false as the published files say; InternVLProcessor tiles all the same
    # (its call-time default), so the serving side must too.
    images = transformers.GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=False, min_patches=1,
        max_patches=MAX_TILES, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )  # fmt: skip
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    images.save_pretrained(out_dir)
    # What InternVLProcessor.save_pretrained writes beside it; the processor itself cannot be
    # built here (its video processor needs torchvision, which has no build for our torch).
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump({"image_seq_length": ROWS_PER_TILE, "processor_class": "InternVLProcessor"}, f)
    tokenizer.chat_template = INTERNVL_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir
