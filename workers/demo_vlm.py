"""Tiny random-weight vision-language checkpoints in real Hugging Face format, built offline.

LLaVA-1.5 (`LlavaForConditionalGeneration`), LLaVA-NeXT (`LlavaNextForConditionalGeneration`),
Qwen2-VL and Qwen2.5-VL, each with its image processor (PIL backend), tokenizer and chat
template; and the original LLaVA repository format (`LlavaLlamaForCausalLM` naming a CLIP
tower directory), written from a LLaVA-NeXT checkpoint with the same weights so the two can
be compared. The weights are random: the models write noise.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import transformers
from safetensors.torch import save_file

from vlmserve.shared.models.llava_original import LlavaOriginalSpec
from vlmserve.workers.demo_checkpoint import fast_tokenizer

log = logging.getLogger("vlmserve.demo_vlm")

VISION_ARCHES = (
    "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
    "llava_original", "llava_original_1_5",
)  # fmt: skip

TEXT = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=4096, initializer_range=0.2,
)  # fmt: skip
CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
    image_size=28, patch_size=14, projection_dim=32, initializer_range=0.2,
)  # fmt: skip
PINPOINTS = [[28, 56], [56, 28], [56, 56]]

# The LLaVA chat template writes "<image>\n" before a user turn's text for each image part,
# and no BOS (the tokenizer adds it), like the Vicuna-based LLaVA checkpoints.
LLAVA_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['content'] is string %}{% set parts = [{'type': 'text', 'text': m['content']}] %}"
    "{% else %}{% set parts = m['content'] %}{% endif %}"
    "{% if m['role'] == 'user' %}USER: {% elif m['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% for p in parts %}{% if p['type'] in ['image', 'image_url'] %}<image>\n{% endif %}"
    "{% endfor %}"
    "{% for p in parts %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] in ['image', 'image_url'] %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _fast_tokenizer(special: list[str], bos: str | None, eos: str, seed: int):  # noqa: ANN202
    return fast_tokenizer(512, special, bos, eos, seed)


def _save(
    model: torch.nn.Module, out_dir: str, eos_id: int, pad_id: int, bos_id: int | None
) -> None:
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    model.save_pretrained(out_dir)


def build_llava(
    out_dir: str, next_: bool = False, seed: int = 0, pad: bool = False, text: dict | None = None
) -> str:
    """LLaVA-1.5, or LLaVA-NeXT (any-resolution tiles and the image newline) with `next_`.
    `pad`: LLaVA-1.5's processor pads each image to a square first (do_pad), as the original
    LLaVA-1.5 checkpoints' preprocessing does. `text`: overrides of the language model's shape
    (the benchmark's LLaVA has head_dim 32, which vLLM's CPU attention accepts)."""
    tokenizer = _fast_tokenizer(["<unk>", "<s>", "</s>"], "<s>", "</s>", seed)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = transformers.LlamaConfig(
        **(TEXT | (text or {})), vocab_size=len(tokenizer), tie_word_embeddings=False
    )
    vision = transformers.CLIPVisionConfig(**CLIP)
    common = dict(
        vision_config=vision, text_config=text, image_token_id=image_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )  # fmt: skip
    size = {"shortest_edge": CLIP["image_size"]}
    crop = {"height": CLIP["image_size"], "width": CLIP["image_size"]}
    if next_:
        config = transformers.LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS)
        model_cls = transformers.LlavaNextForConditionalGeneration
        images = transformers.LlavaNextImageProcessorPil(
            size=size, crop_size=crop, image_grid_pinpoints=PINPOINTS
        )
        processor_cls = transformers.LlavaNextProcessor
    else:
        config = transformers.LlavaConfig(**common)
        model_cls = transformers.LlavaForConditionalGeneration
        images = (
            transformers.LlavaImageProcessorPil(size=size, crop_size=crop, do_pad=True)
            if pad
            else transformers.CLIPImageProcessorPil(size=size, crop_size=crop)
        )
        processor_cls = transformers.LlavaProcessor
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if next_:  # the newline embedding is initialised to zeros-ish scale; make it count
        with torch.no_grad():
            model.model.image_newline.normal_(0, 0.5)
    processor = processor_cls(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=CLIP["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_TEMPLATE,
    )
    os.makedirs(out_dir, exist_ok=True)
    _save(model, out_dir, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    processor.save_pretrained(out_dir)
    tokenizer.chat_template = LLAVA_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_qwen2_vl(out_dir: str, v2_5: bool = False, seed: int = 0) -> str:
    """Qwen2-VL (or Qwen2.5-VL): dynamic resolution, 2x2 patch merging, multimodal RoPE."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = _fast_tokenizer(special, None, "<|im_end|>", seed)
    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": vision_tokens})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in vision_tokens}
    # mrope_section splits head_dim / 2 = 8 rotary frequencies: temporal, height, width.
    text = dict(
        **TEXT, vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    vision = dict(
        depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        in_channels=3, initializer_range=0.2,
    )  # fmt: skip
    if v2_5:
        vision |= dict(hidden_size=32, intermediate_size=64, out_hidden_size=TEXT["hidden_size"],
                       window_size=56, fullatt_block_indexes=[1])  # fmt: skip
        config_cls = transformers.Qwen2_5_VLConfig
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision |= dict(embed_dim=32, hidden_size=TEXT["hidden_size"], mlp_ratio=2)
        config_cls = transformers.Qwen2VLConfig
        model_cls = transformers.Qwen2VLForConditionalGeneration
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    images = transformers.Qwen2VLImageProcessorPil(
        min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, patch_size=14, merge_size=2
    )
    os.makedirs(out_dir, exist_ok=True)
    eos = tokenizer.eos_token_id
    _save(model, out_dir, eos, tokenizer.pad_token_id, None)
    images.save_pretrained(out_dir)
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_llava_original(
    out_dir: str, hf_twin_dir: str, seed: int = 0, version: str = "1.6"
) -> str:
    """The original LLaVA repository's format (`LlavaLlamaForCausalLM`, as
    liuhaotian/llava-v1.6-vicuna-7b, or with `version` "1.5" liuhaotian/llava-v1.5-7b), with
    the weights of a LLaVA-NeXT (LLaVA-1.5 padding images) checkpoint built at `hf_twin_dir`:
    the two must answer alike. Like the published originals, the weights leave out the CLIP
    tower, which config.json names as a directory (clip-tower/ beside them)."""
    v1_6 = version == "1.6"
    if not os.path.exists(os.path.join(hf_twin_dir, "config.json")):
        build_llava(hf_twin_dir, next_=v1_6, seed=seed, pad=not v1_6)
    twin_cls = (
        transformers.LlavaNextForConditionalGeneration
        if v1_6
        else transformers.LlavaForConditionalGeneration
    )
    twin = twin_cls.from_pretrained(hf_twin_dir).eval()
    os.makedirs(out_dir, exist_ok=True)
    tower_dir = os.path.join(out_dir, "clip-tower")
    tower = transformers.CLIPVisionModel(twin.config.vision_config)
    tower.load_state_dict(twin.model.vision_tower.state_dict())
    tower.save_pretrained(tower_dir)
    size = CLIP["image_size"]
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(tower_dir)
    save_original_weights(twin, out_dir)
    text = twin.config.text_config.to_dict()
    config = {
        k: text[k] for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size",
            "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
        ) if k in text
    } | {
        "architectures": list(LlavaOriginalSpec.architectures), "model_type": "llava",
        "tie_word_embeddings": False, "mm_hidden_size": CLIP["hidden_size"],
        "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": tower_dir, "use_mm_proj": True,
    } | (
        {"image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS}
        if v1_6 else {"image_aspect_ratio": "pad"}
    )  # fmt: skip
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer = _fast_tokenizer(["<unk>", "<s>", "</s>"], "<s>", "</s>", seed)  # no <image>
    tokenizer.save_pretrained(out_dir)
    _save_generation_config(out_dir, tokenizer)
    return out_dir


def save_original_weights(twin: torch.nn.Module, out_dir: str) -> None:
    """A transformers LLaVA / LLaVA-NeXT model's weights under the original LLaVA repository's
    names (decoder under `model.`, projector as `model.mm_projector.{0,2}`), without its tower."""
    weights = {f"model.{k}": v for k, v in twin.model.language_model.state_dict().items()}
    weights["lm_head.weight"] = twin.lm_head.weight
    projector = twin.model.multi_modal_projector
    for ours, layer in (("0", projector.linear_1), ("2", projector.linear_2)):
        weights[f"model.mm_projector.{ours}.weight"] = layer.weight
        weights[f"model.mm_projector.{ours}.bias"] = layer.bias
    if hasattr(twin.model, "image_newline"):  # LLaVA-NeXT (v1.6)
        weights["model.image_newline"] = twin.model.image_newline
    save_file({k: v.detach().contiguous() for k, v in weights.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})  # fmt: skip


def _save_generation_config(out_dir: str, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out_dir)


def build_vision_checkpoint(out_dir: str, arch: str, seed: int = 0) -> str:
    """Any of VISION_ARCHES by name (the original LLaVA format gets its twin beside it)."""
    if arch.startswith("llava_original"):
        version = "1.5" if arch == "llava_original_1_5" else "1.6"
        return build_llava_original(out_dir, out_dir.rstrip("/") + "-hf-twin", seed, version)
    if arch in ("llava", "llava_next"):
        return build_llava(out_dir, next_=arch == "llava_next", seed=seed)
    if arch in ("qwen3_vl", "qwen3_vl_moe"):
        from vlmserve.workers.demo_qwen3_vl import build_qwen3_vl  # it imports this module

        return build_qwen3_vl(out_dir, seed=seed, moe=arch == "qwen3_vl_moe")
    return build_qwen2_vl(out_dir, v2_5=arch == "qwen2_5_vl", seed=seed)
