"""Image preprocessing and placeholder expansion, as each model's Hugging Face processor does.

The chat template writes one placeholder per image; here the image processor turns each
image into the arrays its vision tower takes, and the placeholder is expanded to as many
tokens as the tower gives embeddings. The result is the prompt's token ids and, per image,
where its placeholders are and its arrays (sent to the engine as raw frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import transformers
from PIL import Image

from vlmserve.frontend.images import image_hash

LLAVA_ARCHES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
QWEN_VL_ARCHES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


@dataclass
class ProcessedImage:
    offset: int  # first placeholder token
    length: int  # placeholder tokens: one per embedding the vision tower gives
    hash: str
    arrays: dict[str, np.ndarray]  # each with a leading per-image dimension


def placeholder_runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of `token_id` in `ids`."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def needs_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether tokenizing a rendered chat should add the tokenizer's own special tokens (a
    Llama BOS): yes, unless the template already wrote them, as the model's processor does.
    (`apply_chat_template(tokenize=True)` would silently drop a BOS the template leaves out.)"""
    bos = tokenizer.bos_token
    return not (bos is not None and text.startswith(bos))


def tokenize_rendered(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=needs_special_tokens(tokenizer, text))["input_ids"]


class LlavaImages:
    """LLaVA-1.5 and LLaVA-NeXT: the processor expands `<image>` itself."""

    def __init__(self, model_dir: str, hf_config: Any) -> None:
        self.processor = transformers.AutoProcessor.from_pretrained(model_dir)
        self.image_token_id = hf_config.image_token_id
        self.next = hasattr(hf_config, "image_grid_pinpoints")
        self.config = hf_config

    def process(
        self, text: str, images: list[Image.Image]
    ) -> tuple[list[int], list[ProcessedImage]]:
        out = self.processor(
            text=[text],
            images=images,
            return_tensors="np",
            add_special_tokens=needs_special_tokens(self.processor.tokenizer, text),
        )
        ids = out["input_ids"][0].tolist()
        runs = placeholder_runs(ids, self.image_token_id)
        return ids, [
            ProcessedImage(offset, length, image_hash(img), self._arrays(out, i))
            for i, ((offset, length), img) in enumerate(zip(runs, images, strict=True))
        ]

    def _arrays(self, out: Any, i: int) -> dict[str, np.ndarray]:
        if not self.next:
            return {"pixel_values": out["pixel_values"][i : i + 1]}
        return next_arrays(out, i, self.config.image_grid_pinpoints, self.config.vision_config)


def next_arrays(out: Any, i: int, pinpoints: list, vision_config: Any) -> dict[str, np.ndarray]:
    """Image i's LLaVA-NeXT arrays: the processor pads every image to the most tiles in the
    batch; keep this one's own."""
    size = out["image_sizes"][i]
    tiles = transformers.models.llava_next.modeling_llava_next.image_size_to_num_patches(
        image_size=size.tolist(), grid_pinpoints=pinpoints, patch_size=vision_config.image_size
    )
    return {"pixel_values": out["pixel_values"][i, :tiles], "image_sizes": size[None]}


class LlavaOriginalImages:
    """The original LLaVA repository's checkpoints: the CLIP tower's image processor with
    any-resolution tiles, and its tokenization: text around each `<image>` tokenized on its
    own, placeholders put between (as its `tokenizer_image_token` does)."""

    def __init__(self, model_dir: str) -> None:
        from vlmserve.workers.models import llava_original  # JSON and config only; no weights

        self.config = llava_original.hf_config(model_dir)
        clip = transformers.AutoImageProcessor.from_pretrained(llava_original.tower_dir(model_dir))
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
            image_token=self.tokenizer.convert_ids_to_tokens(llava_original.PLACEHOLDER_ID),
        )
        self.placeholder = llava_original.PLACEHOLDER_ID

    def process(
        self, text: str, images: list[Image.Image]
    ) -> tuple[list[int], list[ProcessedImage]]:
        chunks = text.split("<image>")
        if len(chunks) != len(images) + 1:
            raise ValueError(f"{len(chunks) - 1} image placeholders for {len(images)} images")
        out = self.image_processor(images=images, return_tensors="np")
        crop = self.image_processor.crop_size
        ids = tokenize_rendered(self.tokenizer, chunks[0])
        processed = []
        for i, (chunk, img) in enumerate(zip(chunks[1:], images, strict=True)):
            height, width = out["image_sizes"][i].tolist()
            count = self.counter._get_number_of_features(
                height, width, crop["height"], crop["width"]
            )
            arrays = next_arrays(
                out, i, self.config.image_grid_pinpoints, self.config.vision_config
            )
            processed.append(ProcessedImage(len(ids), count, image_hash(img), arrays))
            ids += [self.placeholder] * count
            ids += self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
        return ids, processed


class QwenVLImages:
    """Qwen2-VL and Qwen2.5-VL: dynamic resolution; `<|image_pad|>` becomes one token per
    merged 2x2 patch. (Their AutoProcessor needs torchvision for video; images do not.)"""

    def __init__(self, model_dir: str, hf_config: Any) -> None:
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.image_token_id = hf_config.image_token_id
        self.pad = self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    def process(
        self, text: str, images: list[Image.Image]
    ) -> tuple[list[int], list[ProcessedImage]]:
        out = self.image_processor(images=images, return_tensors="np")
        grids = out["image_grid_thw"]
        merge = self.image_processor.merge_size**2
        parts = text.split(self.pad)
        if len(parts) != len(images) + 1:
            raise ValueError(f"{len(parts) - 1} image placeholders for {len(images)} images")
        counts = [int(np.prod(g)) // merge for g in grids]
        text = parts[0] + "".join(self.pad * n + p for n, p in zip(counts, parts[1:], strict=True))
        ids = tokenize_rendered(self.tokenizer, text)
        bounds = np.cumsum([0, *[int(np.prod(g)) for g in grids]])
        runs = placeholder_runs(ids, self.image_token_id)
        return ids, [
            ProcessedImage(
                offset,
                length,
                image_hash(img),
                {
                    "pixel_values": out["pixel_values"][bounds[i] : bounds[i + 1]],
                    "image_grid_thw": grids[i : i + 1],
                },
            )  # fmt: skip
            for i, ((offset, length), img) in enumerate(zip(runs, images, strict=True))
        ]


ImageProcessor = LlavaImages | QwenVLImages | LlavaOriginalImages


def image_processor_for(model_dir: str, architecture: str) -> ImageProcessor | None:
    """The image side of a vision-language checkpoint; None for a text-only model."""
    if architecture == "LlavaLlamaForCausalLM":
        return LlavaOriginalImages(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if architecture in LLAVA_ARCHES:
        return LlavaImages(model_dir, config)
    if architecture in QWEN_VL_ARCHES:
        return QwenVLImages(model_dir, config)
    return None
