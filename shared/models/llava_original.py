"""Checkpoints in the original LLaVA repository's format (`LlavaLlamaForCausalLM`, e.g.
liuhaotian/llava-v1.6-vicuna-7b): read as the LLaVA-NeXT model they are.

Their config.json is a Llama config plus `mm_*` fields naming a CLIP tower by path or hub id;
they carry no chat template (the "vicuna_v1" conversation format is theirs) and tokenize the text
around each `<image>` on its own. We build the equivalent transformers LlavaNextConfig; the
compute side (vlmserve.workers.models.llava_original) maps the weight names.
"""

from __future__ import annotations

import os
from typing import Any

from vlmserve.shared.models.llava import next_arrays
from vlmserve.shared.models.processing import tokenize_rendered
from vlmserve.shared.models.spec import ImageProcessor, ModelSpec, PlacedImage, read_json

# Placeholder id for image tokens in the prompt: the original code uses -200, outside the
# vocabulary; ours must embed (its rows are then replaced), so it reuses id 0.
PLACEHOLDER_ID = 0

# The conversation format of the original LLaVA-1.5/1.6 Vicuna checkpoints ("vicuna_v1"):
# images go first in a user turn as "<image>\n".
VICUNA_V1_TEMPLATE = (
    "{% set ns = namespace(system='A chat between a curious human and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
    "human\\'s questions.') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}"
    "{% endif %}{% endfor %}{{ ns.system }} "
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{% if m['content'] is string %}{% set parts = [{'type': 'text', 'text': m['content']}] %}"
    "{% else %}{% set parts = m['content'] %}{% endif %}"
    "{% if m['role'] == 'user' %}USER: {% for p in parts %}{% if p['type'] == 'image' %}"
    "<image>{{ '\\n' }}{% endif %}{% endfor %}"
    "{% for p in parts %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for p in parts %}{% if p['type'] == 'text' %}{{ p['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def resolve_tower(model_dir: str, tower: str) -> str:
    """The CLIP tower's directory: a path (absolute, or relative to the checkpoint), or a hub
    id resolved like any model path."""
    for candidate in (tower, os.path.join(model_dir, tower)):
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    from huggingface_hub import snapshot_download

    return snapshot_download(tower)


def tower_dir(model_dir: str) -> str:
    raw = read_json(os.path.join(model_dir, "config.json"))
    return resolve_tower(model_dir, raw["mm_vision_tower"])


def llava_next_config(model_dir: str) -> Any:
    """The transformers LlavaNextConfig equivalent to an original LLaVA-1.6 config."""
    import transformers

    raw = read_json(os.path.join(model_dir, "config.json"))
    if raw.get("image_aspect_ratio") != "anyres" or raw.get("mm_projector_type") != "mlp2x_gelu":
        raise ValueError(
            "only LLaVA-1.6 original checkpoints (image_aspect_ratio 'anyres', mm_projector_type "
            f"'mlp2x_gelu') are supported; got {raw.get('image_aspect_ratio')!r}, "
            f"{raw.get('mm_projector_type')!r}"
        )
    vision = transformers.AutoConfig.from_pretrained(tower_dir(model_dir))
    vision = getattr(vision, "vision_config", vision)  # a full CLIP checkpoint or a tower
    text = {k: v for k, v in raw.items() if not k.startswith(("mm_", "image_", "architectures"))}
    text.pop("model_type", None)
    select = {"patch": "default", "cls_patch": "full"}[raw.get("mm_vision_select_feature", "patch")]
    return transformers.LlavaNextConfig(
        vision_config=vision.to_dict() | {"model_type": "clip_vision_model"},
        text_config=transformers.LlamaConfig(**text).to_dict(),
        image_token_id=PLACEHOLDER_ID,
        image_grid_pinpoints=raw["image_grid_pinpoints"],
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=select,
        projector_hidden_act="gelu",
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        architectures=["LlavaNextForConditionalGeneration"],
    )


class LlavaOriginalImages:
    """The CLIP tower's image processor with any-resolution tiles, and the original
    tokenization: text around each `<image>` tokenized on its own, placeholders put between
    (as its `tokenizer_image_token` does)."""

    def __init__(self, model_dir: str) -> None:
        import transformers

        self.config = llava_next_config(model_dir)
        clip = transformers.AutoImageProcessor.from_pretrained(tower_dir(model_dir))
        self.image_processor = transformers.LlavaNextImageProcessorPil(
            size=clip.size,
            crop_size=clip.crop_size,
            image_mean=clip.image_mean,
            image_std=clip.image_std,
            image_grid_pinpoints=self.config.image_grid_pinpoints,
        )
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        # Counts placeholders the way transformers' LLaVA-NeXT processor does.
        self.counter = transformers.LlavaNextProcessor(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            patch_size=self.config.vision_config.patch_size,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_token=self.tokenizer.convert_ids_to_tokens(PLACEHOLDER_ID),
        )

    def process(self, text: str, images: list) -> tuple[list[int], list[PlacedImage]]:
        chunks = text.split("<image>")
        if len(chunks) != len(images) + 1:
            raise ValueError(f"{len(chunks) - 1} image placeholders for {len(images)} images")
        out = self.image_processor(images=images, return_tensors="np")
        crop = self.image_processor.crop_size
        ids = tokenize_rendered(self.tokenizer, chunks[0])
        placed = []
        for i, chunk in enumerate(chunks[1:]):
            height, width = out["image_sizes"][i].tolist()
            count = self.counter._get_number_of_features(
                height, width, crop["height"], crop["width"]
            )
            arrays = next_arrays(
                out, i, self.config.image_grid_pinpoints, self.config.vision_config
            )
            placed.append(PlacedImage(len(ids), count, arrays))
            ids += [PLACEHOLDER_ID] * count
            ids += self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
        return ids, placed


class LlavaOriginalSpec(ModelSpec):
    family = "llava_original"
    architectures = ("LlavaLlamaForCausalLM",)

    def hf_config(self, model_dir: str) -> Any:
        return llava_next_config(model_dir)

    def image_processor(self, model_dir: str) -> ImageProcessor:
        return LlavaOriginalImages(model_dir)

    def chat_template(self) -> str:
        return VICUNA_V1_TEMPLATE


SPECS = [LlavaOriginalSpec()]
