"""LLaVA-1.5 (`llava-hf/...`) and LLaVA-NeXT / v1.6 checkpoints in Hugging Face format.

Their processor expands each `<image>` itself (LLaVA-NeXT: into any-resolution tiles plus
image newlines), so the input side runs it as it is.
"""

from __future__ import annotations

from typing import Any

from vlmserve.shared.models.processing import needs_special_tokens, placeholder_runs
from vlmserve.shared.models.spec import (
    LLAMA_FAMILY_DECODERS,
    ImageProcessor,
    ModelSpec,
    PlacedImage,
)


class LlavaImages:
    def __init__(self, model_dir: str, hf_config: Any) -> None:
        import transformers

        self.processor = transformers.AutoProcessor.from_pretrained(model_dir)
        self.config = hf_config
        self.next = hasattr(self.config, "image_grid_pinpoints")

    def process(self, text: str, images: list) -> tuple[list[int], list[PlacedImage]]:
        out = self.processor(
            text=[text],
            images=images,
            return_tensors="np",
            add_special_tokens=needs_special_tokens(self.processor.tokenizer, text),
        )
        ids = out["input_ids"][0].tolist()
        runs = placeholder_runs(ids, self.config.image_token_id)
        if len(runs) != len(images):
            raise ValueError(f"{len(runs)} image placeholders for {len(images)} images")
        return ids, [
            PlacedImage(offset, length, self._arrays(out, i))
            for i, (offset, length) in enumerate(runs)
        ]

    def _arrays(self, out: Any, i: int) -> dict:
        if not self.next:
            return {"pixel_values": out["pixel_values"][i : i + 1]}
        return next_arrays(out, i, self.config.image_grid_pinpoints, self.config.vision_config)


def next_arrays(out: Any, i: int, pinpoints: list, vision_config: Any) -> dict:
    """Image i's LLaVA-NeXT arrays: the processor pads every image to the most tiles in the
    batch; keep this one's own."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = out["image_sizes"][i]
    tiles = image_size_to_num_patches(
        image_size=size.tolist(), grid_pinpoints=pinpoints, patch_size=vision_config.image_size
    )
    return {"pixel_values": out["pixel_values"][i, :tiles], "image_sizes": size[None]}


class LlavaSpec(ModelSpec):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    text_decoders = LLAMA_FAMILY_DECODERS

    def image_processor(self, model_dir: str) -> ImageProcessor:
        return LlavaImages(model_dir, self.hf_config(model_dir))


class LlavaNextSpec(LlavaSpec):
    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)


SPECS = [LlavaSpec(), LlavaNextSpec()]
