"""A tiny random-weight Mistral 3 checkpoint in Hugging Face format
(`Mistral3ForConditionalGeneration`, the layout of mistralai/Mistral-Small-3.1-24B-Instruct-2503),
built offline: transformers' Pixtral tower (2D RoPE over 4-pixel patches, images of any aspect
ratio up to 48 pixels on their longest edge), the projector with its 2x2 patch merger, a Mistral
decoder, and its processor's files: an image becomes rows of `[IMG]` tokens, each row ended by
`[IMG_BREAK]` and the last by `[IMG_END]`; Mistral's special tokens at their published ids
(`[IMG]` = 10, `[IMG_BREAK]` = 12, `[IMG_END]` = 13) and its `[INST]` chat format."""

from __future__ import annotations

import json
import os

import torch
import transformers

from vlmserve.workers.demo_checkpoint import fast_tokenizer
from vlmserve.workers.demo_vlm import TEXT

PATCH, MERGE, LONGEST_EDGE = 4, 2, 48
# Mistral Small 3.1's first special tokens, in their published order (ids 0-19).
SPECIAL = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]  # fmt: skip
# Mistral Small 3.1's format, shortened: BOS, an optional system prompt, [INST] user turns
# (images written as [IMG] where their parts are) and assistant turns ended by </s>.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'] }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}"
    "{% elif p['type'] in ['image', 'image_url'] %}[IMG]{% endif %}{% endfor %}{% endif %}"
    "[/INST]{% elif m['role'] == 'assistant' %}{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}{% endif %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def build_mistral3(out_dir: str, seed: int = 0) -> str:
    tokenizer = fast_tokenizer(512, SPECIAL, "<s>", "</s>", seed)
    text = dict(
        **TEXT, vocab_size=len(tokenizer), rms_norm_eps=1e-5, rope_theta=1000000000.0,
        sliding_window=None, head_dim=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, model_type="mistral",
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        head_dim=16, image_size=LONGEST_EDGE, patch_size=PATCH, initializer_range=0.2,
        model_type="pixtral",
    )  # fmt: skip
    config = transformers.Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=MERGE,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    # Random weights wider than the default initializer, so greedy choices are not near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "multi_modal_projector" in name and p.dim() == 2:
                p.normal_(0, 0.2)
    os.makedirs(out_dir, exist_ok=True)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    # As Mistral Small 3.1's config.json: no tie_word_embeddings (transformers' Mistral3Config
    # then says True) beside an lm_head of its own.
    with open(os.path.join(out_dir, "config.json")) as f:
        saved = json.load(f)
    saved.pop("tie_word_embeddings")
    saved["text_config"].pop("tie_word_embeddings")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(saved, f, indent=2)
    images = transformers.PixtralImageProcessorPil(
        size={"longest_edge": LONGEST_EDGE}, patch_size={"height": PATCH, "width": PATCH},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )  # fmt: skip
    images.save_pretrained(out_dir)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out_dir)
    processor = dict(
        image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
        patch_size=PATCH, spatial_merge_size=MERGE, processor_class="PixtralProcessor",
    )  # fmt: skip
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump(processor, f, indent=2)
    return out_dir
