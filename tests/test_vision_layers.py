"""The vision tower without the encoder layers its features never read
(workers/models/vision.py, drop_layers_past_features), compared with transformers' whole
model: LLaVA reads CLIP's second-to-last hidden states, so its last layer is dropped."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from vlmserve.workers.demo_vlm import build_llava
from vlmserve.workers.loader import load_model
from vlmserve.workers.models.vision import VisionEncoder

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_llava(str(tmp_path_factory.mktemp("vision_layers") / "llava"))


def theirs_features(model: transformers.LlavaForConditionalGeneration, pixels: torch.Tensor):
    with torch.no_grad():
        return torch.cat(list(model.model.get_image_features(pixels).pooler_output))


def test_the_loaded_llava_tower_stops_at_its_feature_layer(llava: str) -> None:
    """The loader skips the dropped layer's tensors and the features are transformers' own,
    bit for bit (--cpu-gemm aten: the same F.linear calls)."""
    ours = load_model(llava, torch.float32, CPU, "aten")
    layers = ours.vision.hf.vision_tower.encoder.layers
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(llava).eval()
    total = theirs.config.vision_config.num_hidden_layers
    assert theirs.config.vision_feature_layer == -2 and len(layers) == total - 1
    assert ours.skipped_weights == (f"vision.hf.vision_tower.encoder.layers.{total - 1}.",)
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = torch.cat(ours.vision({"pixel_values": pixels}))
    torch.testing.assert_close(features, theirs_features(theirs, pixels), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("selected", "kept"), [(-1, 3), (-3, 1), ([-2, -3], 2), ([0, -1], 3), (1, 1)]
)
def test_any_selection_reads_the_same_hidden_states(
    llava: str, selected: int | list[int], kept: int
) -> None:
    """Other selections (one layer, several concatenated, counted from either end) keep the
    layers up to the deepest one read and give transformers' features (random weights: a
    list widens the projector's input, which the checkpoint's does not take)."""
    config = copy.deepcopy(transformers.AutoConfig.from_pretrained(llava))
    config.vision_feature_layer = selected
    torch.manual_seed(0)
    theirs = transformers.LlavaForConditionalGeneration(config).eval()
    encoder = VisionEncoder(config, "LlavaModel")
    assert len(encoder.hf.vision_tower.encoder.layers) == kept
    assert encoder.dropped == [f"hf.vision_tower.encoder.layers.{i}." for i in range(kept, 3)]
    state = {k: v for k, v in theirs.model.state_dict().items() if not k.startswith("language")}
    missing, unexpected = encoder.hf.load_state_dict(state, strict=False)
    assert not missing
    assert {k.split(".layers.")[1].split(".")[0] for k in unexpected} <= {"1", "2"}
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = torch.cat(encoder({"pixel_values": pixels}))
    torch.testing.assert_close(features, theirs_features(theirs, pixels), rtol=0, atol=0)
