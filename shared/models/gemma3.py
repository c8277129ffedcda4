"""Gemma 3: `Gemma3ForConditionalGeneration` (gemma-3-4b/12b/27b-it) and the text-only
`Gemma3ForCausalLM` (gemma-3-1b-it, model_type gemma3_text).

The chat template writes `<start_of_image>` where an image goes; transformers' Gemma3Processor
(which loads here without torchvision: its image processor has a PIL build) replaces each with

    \\n\\n<start_of_image><image_soft_token> * mm_tokens_per_image<end_of_image>\\n\\n

so an image's placeholders are one run of soft tokens, the run its `token_type_ids` mark, and
the span whose tokens attend to each other both ways. Pan-and-scan (more crops per image) is
off by default in transformers, and refused here when a checkpoint turns it on.
"""

from __future__ import annotations

import os
from typing import Any

from vlmserve.shared.models.processing import needs_special_tokens, placeholder_runs
from vlmserve.shared.models.spec import ImageProcessor, ModelSpec, PlacedImage, read_json

# Gemma3TextConfig's default context, for configs (gemma-3-4b-it's) that do not say theirs.
DEFAULT_CONTEXT = 131072


class Gemma3Images:
    def __init__(self, model_dir: str, hf_config: Any) -> None:
        import transformers

        self.processor = transformers.AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.image_token_id: int = hf_config.image_token_id
        self.boi_token: str = self.processor.boi_token
        self.seq_len: int = hf_config.mm_tokens_per_image
        if self.processor.image_seq_length != self.seq_len:
            raise ValueError(
                f"the processor's image_seq_length {self.processor.image_seq_length} is not the "
                f"model's mm_tokens_per_image {self.seq_len}"
            )

    def process(self, text: str, images: list) -> tuple[list[int], list[PlacedImage]]:
        count = text.count(self.boi_token)
        if count != len(images):
            raise ValueError(f"{count} image placeholders for {len(images)} images")
        out = self.processor(
            text=[text],
            images=images or None,
            return_tensors="np",
            add_special_tokens=needs_special_tokens(self.tokenizer, text),
        )
        ids = out["input_ids"][0].tolist()
        runs = placeholder_runs(ids, self.image_token_id)
        if len(runs) != len(images) or any(n != self.seq_len for _, n in runs):
            raise ValueError("the prompt's text runs into its image placeholders")
        return ids, [
            PlacedImage(offset, length, {"pixel_values": out["pixel_values"][i : i + 1]})
            for i, (offset, length) in enumerate(runs)
        ]


class Gemma3TextSpec(ModelSpec):
    family = "gemma3_text"
    architectures = ("Gemma3ForCausalLM",)

    def check_config(self, raw: dict) -> None:
        super().check_config(raw)
        text = self.text_config(raw)
        if text.get("attn_logit_softcapping") is not None:
            raise ValueError("Gemma attention logit soft-capping is not supported")

    def max_context(self, text: dict) -> int:
        # Sliding layers attend within their window; global layers see the whole context.
        return int(text.get("max_position_embeddings", DEFAULT_CONTEXT))


class Gemma3Spec(Gemma3TextSpec):
    family = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    bidirectional_images = True

    def check_config(self, raw: dict) -> None:
        super().check_config(raw)
        text = self.text_config(raw)
        window, soft = text.get("sliding_window", 4096), raw.get("mm_tokens_per_image", 256)
        if window is not None and soft > window:
            # transformers ANDs the window onto an image's both-ways mask: within a window
            # as long as the image, that and our (window AND causal) OR same-image agree.
            raise ValueError(f"mm_tokens_per_image {soft} is longer than sliding_window {window}")

    def image_processor(self, model_dir: str) -> ImageProcessor:
        published = read_json(os.path.join(model_dir, "preprocessor_config.json"))
        if published.get("do_pan_and_scan"):
            raise ValueError("Gemma 3 pan-and-scan (do_pan_and_scan) is not supported")
        return Gemma3Images(model_dir, self.hf_config(model_dir))


SPECS = [Gemma3TextSpec(), Gemma3Spec()]
