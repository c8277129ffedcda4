"""LLaVA-1.5 and LLaVA-NeXT (Hugging Face format): a CLIP tower, an MLP projector, and for
NeXT any-resolution tiles with image newlines, all transformers' own; our Llama-family decoder."""

from __future__ import annotations

from vlmserve.workers.models.vlm import VisionLanguageModel

# Both the layout of checkpoints on the hub (saved by transformers 4) and that of
# transformers 5 models.
NAME_PREFIXES = [
    ("model.language_model.", "language.model."),
    ("language_model.model.", "language.model."),
    ("language_model.lm_head.", "language.lm_head."),
    ("lm_head.", "language.lm_head."),
    ("model.vision_tower.", "vision.hf.vision_tower."),
    ("vision_tower.", "vision.hf.vision_tower."),
    ("model.multi_modal_projector.", "vision.hf.multi_modal_projector."),
    ("multi_modal_projector.", "vision.hf.multi_modal_projector."),
    ("model.image_newline", "vision.hf.image_newline"),
    ("image_newline", "vision.hf.image_newline"),
]


class LlavaModel(VisionLanguageModel):
    vision_half = "LlavaModel"
    name_prefixes = NAME_PREFIXES

    def map_checkpoint_name(self, name: str) -> str:
        name = super().map_checkpoint_name(name)
        # transformers 4 saved CLIP towers with a `vision_model.` level that 5 no longer has.
        return name.replace("vision.hf.vision_tower.vision_model.", "vision.hf.vision_tower.")


class LlavaNextModel(LlavaModel):
    vision_half = "LlavaNextModel"
