"""The original LLaVA repository's checkpoints (`LlavaLlamaForCausalLM`), computed as the
LLaVA-NeXT (v1.6) or LLaVA (v1.5) model they are (the spec,
vlmserve.shared.models.llava_original, builds the config).

Their weights sit under `model.` with the projector as `model.mm_projector.{0,2}`; the CLIP
tower is either inside the checkpoint or only named by it, and then loaded from its own folder.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from safetensors import safe_open

from vlmserve.shared.models.llava_original import tower_dir
from vlmserve.workers.models.llava import LlavaNextModel
from vlmserve.workers.models.vlm import WeightSource

NAME_PREFIXES = [
    ("model.mm_projector.0.", "vision.hf.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "vision.hf.multi_modal_projector.linear_2."),
    ("model.image_newline", "vision.hf.image_newline"),
    ("model.vision_tower.vision_tower.vision_model.", "vision.hf.vision_tower."),
    ("model.", "language.model."),
    ("lm_head.", "language.lm_head."),
]
TOWER_IN_CHECKPOINT = "model.vision_tower."


def tower_name(name: str) -> str | None:
    """A CLIP tower checkpoint's tensor name as ours; None for what we do not use (the text
    half and projections of a full CLIP checkpoint)."""
    if name.startswith("vision_model."):  # a full CLIPModel, or a tower saved by transformers 4
        return "vision.hf.vision_tower." + name[len("vision_model.") :]
    if name.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
        return "vision.hf.vision_tower." + name
    return None


def _has_tower(model_dir: str) -> bool:
    for path in glob.glob(os.path.join(model_dir, "*.safetensors")):
        with safe_open(path, framework="pt") as f:
            if any(name.startswith(TOWER_IN_CHECKPOINT) for name in f.keys()):
                return True
    return False


class LlavaOriginalModel(LlavaNextModel):
    name_prefixes = NAME_PREFIXES

    def vision_class(self, hf_config: Any) -> str:
        # v1.6 checkpoints tile images (LLaVA-NeXT); v1.5 ones do not (LLaVA).
        return "LlavaNextModel" if hasattr(hf_config, "image_grid_pinpoints") else "LlavaModel"

    def weight_sources(self, model_dir: str) -> list[WeightSource]:
        if _has_tower(model_dir):
            return [(model_dir, None)]
        # The checkpoint names its CLIP tower instead of carrying it: load it from there.
        return [(model_dir, None), (tower_dir(model_dir), tower_name)]
