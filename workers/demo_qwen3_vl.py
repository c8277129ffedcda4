"""A tiny random-weight Qwen3-VL checkpoint (`Qwen3VLForConditionalGeneration`) in Hugging Face
format, built offline: Qwen3 decoder (q/k norms), interleaved multimodal RoPE, a ViT with a
learned position grid and two DeepStack levels (one per decoder layer), its image processor
sized in pixels (`size` shortest/longest edge), a video processor config (its `size` bounds a
whole video's frames x height x width) and a ChatML template."""

from __future__ import annotations

import json
import os

import torch
import transformers

from vlmserve.workers.demo_checkpoint import fast_tokenizer
from vlmserve.workers.demo_vlm import QWEN_VL_TEMPLATE, TEXT

PATCH, MERGE = 16, 2
TOKEN_PIXELS = (PATCH * MERGE) ** 2  # one placeholder token per merged 32x32 patch


# The MoE variant (`Qwen3VLMoeForConditionalGeneration`): 8 experts, top 2, 3 layers of which
# the middle one keeps a dense MLP (mlp_only_layers), so both kinds of layer are exercised.
MOE = dict(
    num_hidden_layers=3, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
    decoder_sparse_step=1, mlp_only_layers=[1],
)  # fmt: skip


def build_qwen3_vl(out_dir: str, seed: int = 0, moe: bool = False) -> str:
    """The dense checkpoint, or with `moe` the Qwen3-VL-MoE one."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = fast_tokenizer(512, special, None, "<|im_end|>", seed)
    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": vision_tokens})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in vision_tokens}
    # head_dim 16: 8 rotary frequencies, interleaved t h w t h w t h (sections 2, 3, 3).
    text = dict(
        **TEXT, head_dim=16, vocab_size=len(tokenizer), rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                         "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if moe:
        text |= MOE
    vision = dict(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3,
        num_position_embeddings=64, deepstack_visual_indexes=[0, 2], initializer_range=0.2,
    )  # fmt: skip
    config_class = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model_class = (
        transformers.Qwen3VLMoeForConditionalGeneration
        if moe
        else transformers.Qwen3VLForConditionalGeneration
    )
    model = model_class(config).eval()
    images = transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * TOKEN_PIXELS, "longest_edge": 64 * TOKEN_PIXELS},
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    images.save_pretrained(out_dir)
    # Written by hand: Qwen3VLVideoProcessor needs torchvision, which has no build for our torch.
    video = dict(
        size={"shortest_edge": 4 * TOKEN_PIXELS, "longest_edge": 256 * TOKEN_PIXELS},
        patch_size=PATCH, temporal_patch_size=2, merge_size=MERGE,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        processor_class="Qwen3VLProcessor", video_processor_type="Qwen3VLVideoProcessor",
    )  # fmt: skip
    with open(os.path.join(out_dir, "video_preprocessor_config.json"), "w") as f:
        json.dump(video, f, indent=2)
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir
