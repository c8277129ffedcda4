"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`):
each image is split into a grid of sub-images plus a downscaled global image, every frame
becoming `image_seq_len` `<image>` tokens (after the connector's pixel shuffle).

Their processor writes one image as

    <fake_token_around_image><row_1_col_1><image>*n ... <row_R_col_C><image>*n \\n
    \\n<fake_token_around_image><global-img><image>*n<fake_token_around_image>

(or only the global part when the image is not split), so an image's placeholders are not one
run: its span holds separator tokens between them, which keep their own embeddings (the compute
side sets `image_span_holds_text`). SmolVLM's AutoProcessor needs torchvision and num2words (for
video), so the image processor runs alone and the expansion is transformers' own
`get_image_prompt_string`, the string both processors write.
"""

from __future__ import annotations

import os
from typing import Any

from vlmserve.shared.models.processing import placeholder_runs, tokenize_rendered
from vlmserve.shared.models.spec import (
    LLAMA_FAMILY_DECODERS,
    ImageProcessor,
    ModelSpec,
    PlacedImage,
    read_json,
)

FRAME_ARRAYS = ("pixel_values", "pixel_attention_mask")  # per frame: [frames, ...]


def image_seq_len(hf_config: Any) -> int:
    """Placeholders per frame: the tower's patches over the pixel shuffle's factor squared (the
    rows the connector returns; the processor's `image_seq_len` is the same number)."""
    vision = hf_config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // hf_config.scale_factor**2


class Idefics3Images:
    def __init__(self, model_dir: str, hf_config: Any) -> None:
        import transformers

        self.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.image_token_id = hf_config.image_token_id
        self.seq_len = image_seq_len(hf_config)
        published = read_json(os.path.join(model_dir, "processor_config.json"))
        if published.get("image_seq_len", self.seq_len) != self.seq_len:
            raise ValueError(
                f"processor_config.json's image_seq_len {published['image_seq_len']} is not the "
                f"{self.seq_len} rows per frame that the model's vision config gives"
            )
        tok = self.tokenizer  # SmolVLM's tokenizer may name its own tokens, as its processor reads
        self.tokens = dict(
            fake_token_around_image=getattr(tok, "fake_image_token", "<fake_token_around_image>"),
            image_token=getattr(tok, "image_token", "<image>"),
            global_image_token=getattr(tok, "global_image_token", "<global-img>"),
        )

    def process(self, text: str, images: list) -> tuple[list[int], list[PlacedImage]]:
        import numpy as np
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        parts = text.split(self.tokens["image_token"])
        if len(parts) != len(images) + 1:
            raise ValueError(f"{len(parts) - 1} image placeholders for {len(images)} images")
        # One prompt's images together, as the processor takes them: [1, frames, 3, H, W].
        out = self.image_processor(images=[images], return_tensors="np", return_row_col_info=True)
        grids = list(zip(out["rows"][0], out["cols"][0], strict=True))
        expanded = [get_image_prompt_string(r, c, self.seq_len, **self.tokens) for r, c in grids]
        text = parts[0] + "".join(e + p for e, p in zip(expanded, parts[1:], strict=True))
        ids = tokenize_rendered(self.tokenizer, text)
        runs = placeholder_runs(ids, self.image_token_id)
        frames = [r * c + 1 if r else 1 for r, c in grids]  # sub-images, then the global one
        if len(runs) != sum(frames) or any(n != self.seq_len for _, n in runs):
            raise ValueError("the prompt's text runs into its image placeholders")
        placed, first = [], 0
        for n in frames:  # an image spans its first frame's run to its last one's
            (start, _), (last, length) = runs[first], runs[first + n - 1]
            arrays = {k: out[k][0, first : first + n] for k in FRAME_ARRAYS if k in out}
            arrays["frames"] = np.array([n])  # batched images' frames are split by it
            placed.append(PlacedImage(start, last + length - start, arrays))
            first += n
        return ids, placed


class Idefics3Spec(ModelSpec):
    family = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration",)
    text_decoders = LLAMA_FAMILY_DECODERS

    def image_processor(self, model_dir: str) -> ImageProcessor:
        return Idefics3Images(model_dir, self.hf_config(model_dir))


class SmolVLMSpec(Idefics3Spec):
    family = "smolvlm"
    architectures = ("SmolVLMForConditionalGeneration",)


SPECS = [Idefics3Spec(), SmolVLMSpec()]
