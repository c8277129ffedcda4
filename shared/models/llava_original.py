"""Checkpoints in the original LLaVA repository's format (`LlavaLlamaForCausalLM`, e.g.
liuhaotian/llava-v1.5-7b, liuhaotian/llava-v1.6-vicuna-7b): read as the LLaVA (v1.5) or
LLaVA-NeXT (v1.6) model they are.

Their config.json is a Llama config plus `mm_*` fields naming a CLIP tower by path or hub id;
they carry no chat template (the "vicuna_v1" conversation format is theirs) and tokenize the text
around each `<image>` on its own. We build the equivalent transformers config; the
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


def original_config(model_dir: str) -> Any:
    """The transformers config equivalent to an original LLaVA config: LLaVA-NeXT for a v1.6
    (`image_aspect_ratio` "anyres"), LLaVA for a v1.5 ("pad": each image padded to a square)."""
    import transformers

    raw = read_json(os.path.join(model_dir, "config.json"))
    aspect, projector = raw.get("image_aspect_ratio"), raw.get("mm_projector_type")
    if aspect not in ("anyres", "pad") or projector != "mlp2x_gelu":
        raise ValueError(
            "only original LLaVA-1.5 and 1.6 checkpoints (image_aspect_ratio 'pad' or 'anyres', "
            f"mm_projector_type 'mlp2x_gelu') are supported; got {aspect!r}, {projector!r}"
        )
    vision = transformers.AutoConfig.from_pretrained(tower_dir(model_dir))
    vision = getattr(vision, "vision_config", vision)  # a full CLIP checkpoint or a tower
    text = {k: v for k, v in raw.items() if not k.startswith(("mm_", "image_", "architectures"))}
    text.pop("model_type", None)
    select = {"patch": "default", "cls_patch": "full"}[raw.get("mm_vision_select_feature", "patch")]
    common = dict(
        vision_config=vision.to_dict() | {"model_type": "clip_vision_model"},
        text_config=transformers.LlamaConfig(**text).to_dict(),
        image_token_id=PLACEHOLDER_ID,
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=select,
        projector_hidden_act="gelu",
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
    )
    if aspect == "pad":
        return transformers.LlavaConfig(**common, architectures=["LlavaForConditionalGeneration"])
    return transformers.LlavaNextConfig(
        **common,
        image_grid_pinpoints=raw["image_grid_pinpoints"],
        architectures=["LlavaNextForConditionalGeneration"],
    )


class LlavaOriginalImages:
    """The CLIP tower's image processor (v1.6: any-resolution tiles; v1.5: padded to a square
    of the mean colour first, as the original `expand2square` does), and the original
    tokenization: text around each `<image>` tokenized on its own, placeholders put between
    (as its `tokenizer_image_token` does)."""

    def __init__(self, model_dir: str) -> None:
        import transformers

        self.config = original_config(model_dir)
        self.anyres = hasattr(self.config, "image_grid_pinpoints")
        clip = transformers.AutoImageProcessor.from_pretrained(tower_dir(model_dir))
        settings = dict(
            size=clip.size, crop_size=clip.crop_size, image_mean=clip.image_mean,
            image_std=clip.image_std,
        )  # fmt: skip
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        vision = self.config.vision_config
        if self.anyres:
            self.image_processor = transformers.LlavaNextImageProcessorPil(
                **settings, image_grid_pinpoints=self.config.image_grid_pinpoints
            )
            # Counts placeholders the way transformers' LLaVA-NeXT processor does.
            self.counter = transformers.LlavaNextProcessor(
                image_processor=self.image_processor,
                tokenizer=self.tokenizer,
                patch_size=vision.patch_size,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                image_token=self.tokenizer.convert_ids_to_tokens(PLACEHOLDER_ID),
            )
        else:
            self.image_processor = transformers.LlavaImageProcessorPil(**settings, do_pad=True)
            patches = (vision.image_size // vision.patch_size) ** 2
            full = self.config.vision_feature_select_strategy == "full"
            self.count = patches + 1 if full else patches  # with or without CLIP's CLS row

    def process(self, text: str, images: list) -> tuple[list[int], list[PlacedImage]]:
        chunks = text.split("<image>")
        if len(chunks) != len(images) + 1:
            raise ValueError(f"{len(chunks) - 1} image placeholders for {len(images)} images")
        out = self.image_processor(images=images, return_tensors="np")
        ids = tokenize_rendered(self.tokenizer, chunks[0])
        placed = []
        for i, chunk in enumerate(chunks[1:]):
            count, arrays = self._image(out, i)
            placed.append(PlacedImage(len(ids), count, arrays))
            ids += [PLACEHOLDER_ID] * count
            ids += self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
        return ids, placed

    def _image(self, out: Any, i: int) -> tuple[int, dict]:
        """Image i's placeholder count and arrays."""
        if not self.anyres:
            return self.count, {"pixel_values": out["pixel_values"][i : i + 1]}
        crop = self.image_processor.crop_size
        height, width = out["image_sizes"][i].tolist()
        count = self.counter._get_number_of_features(height, width, crop["height"], crop["width"])
        config = self.config
        return count, next_arrays(out, i, config.image_grid_pinpoints, config.vision_config)


class LlavaOriginalSpec(ModelSpec):
    family = "llava_original"
    architectures = ("LlavaLlamaForCausalLM",)

    def hf_config(self, model_dir: str) -> Any:
        return original_config(model_dir)

    def image_processor(self, model_dir: str) -> ImageProcessor:
        return LlavaOriginalImages(model_dir)

    def chat_template(self) -> str:
        return VICUNA_V1_TEMPLATE


SPECS = [LlavaOriginalSpec()]
