"""Our model implementations against transformers, in-process (no engine processes).

For each text architecture and the RoPE scaling types their configs use, the logits of one
prefill through our paged model must equal transformers' forward on the same checkpoint
(float32). And the vision encoder runs once per distinct image: a step batches every new
image, and an image seen before comes from the cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vlmserve.shared.arrays import to_frames
from vlmserve.shared.messages import ImageMeta, NewSeq, SamplingParams, SeqStep, StepPlan
from vlmserve.shared.models import checkpoint_spec
from vlmserve.workers.attention.context import step_context
from vlmserve.workers.attention.metadata import build_metadata
from vlmserve.workers.attention.torch_backend import TorchBackend
from vlmserve.workers.demo_checkpoint import build_checkpoint
from vlmserve.workers.demo_vlm import build_llava
from vlmserve.workers.kv_pool import KVPool
from vlmserve.workers.loader import load_model
from vlmserve.workers.model_runner import ModelRunner

CPU = torch.device("cpu")
ROPE_CASES = [
    ("llama", None),
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
    ("llama", {"rope_type": "linear", "factor": 2.0}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}),
    ("mistral", None),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "rope"), ROPE_CASES)
def test_prefill_logits_equal_transformers(arch: str, rope: dict | None, tmp_path) -> None:  # noqa: ANN001
    model_dir = build_checkpoint(str(tmp_path / arch), arch=arch, rope_scaling=rope)
    ours = load_model(model_dir, torch.float32, CPU)
    backend = TorchBackend(KVPool.for_model(ours, 16, 16, torch.float32, CPU))
    ids = torch.tensor(np.random.default_rng(0).integers(3, 512, 200))
    metadata = build_metadata([0], [len(ids)], [list(range(16))], 16, CPU)
    with torch.no_grad(), step_context(metadata, backend):
        logits = ours.compute_logits(ours(ids, metadata.positions))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = theirs(ids[None]).logits[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_vision_encoder_runs_once_per_distinct_image(tmp_path) -> None:  # noqa: ANN001
    model_dir = build_llava(str(tmp_path / "llava"))
    model = load_model(model_dir, torch.float32, CPU)
    backend = TorchBackend(KVPool.for_model(model, 64, 16, torch.float32, CPU))
    batches: list[int] = []
    encode = model.vision.forward

    def counting(arrays: dict) -> list:
        batches.append(arrays["pixel_values"].shape[0])
        return encode(arrays)

    model.vision.forward = counting
    runner = ModelRunner(model, backend, [2], CPU, encoder_cache_bytes=1 << 20)
    images = checkpoint_spec(model_dir).image_processor(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))

    def new_seq(seq_id: int, image: Image.Image) -> tuple[NewSeq, SeqStep, list]:
        ids, [placed] = images.process(text, [image])
        metas, frames = to_frames(placed.arrays)
        key = str(image.getpixel((0, 0)))  # the content key: these images are one colour each
        meta = ImageMeta(key, placed.offset, placed.length, metas)
        sp = SamplingParams(temperature=0)
        blocks = list(range(seq_id * 4, seq_id * 4 + 4))
        return (
            NewSeq(seq_id, ids, len(ids), sp, 0, [meta]),
            SeqStep(seq_id, 0, len(ids), blocks),
            frames,
        )

    first = [new_seq(0, red), new_seq(1, blue), new_seq(2, red)]
    runner.execute(StepPlan(0, [n for n, _, _ in first], [s for _, s, _ in first]),
                   [f for _, _, fs in first for f in fs])  # fmt: skip
    assert batches == [2], "one batch for the step, the repeated image encoded once"
    again, step, frames = new_seq(3, blue)
    runner.execute(StepPlan(1, [again], [step]), frames)
    assert batches == [2], "an image seen before comes from the cache"
