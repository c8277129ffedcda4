"""Video input for Qwen3-VL: frames sampled by Qwen3VLVideoProcessor's rule, the video sized as
a whole, each temporal patch behind its timestamp text, placed in time by get_rope_index, with
DeepStack on the video rows.

transformers' Qwen3VLVideoProcessor needs torchvision (none for our torch), so the references
run transformers' own sampling, sizing and prompt code (`sample_frames`, `smart_resize`,
Qwen3VLProcessor.replace_video_token) on stand-ins for the processor objects, and build
`pixel_values_videos` with test_video's hand-written layout from frames that need no resizing.
"""

from __future__ import annotations

import os
import re
import types

import numpy as np
import openai
import pytest
import torch
import transformers
from PIL import Image
from server_fixtures import file_server, local_config
from test_video import (
    MAX_NEW,
    all_frames,
    chat_text,
    check_reply,
    greedy_ids,
    make_clip,
    reference_video,
    video_data_url,
)
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
    Qwen3VLVideoProcessor,
    smart_resize,
)
from transformers.video_utils import VideoMetadata
from vlm_reference import data_url, greedy_chats

from vlmserve.deploy.launcher import server
from vlmserve.frontend.video import Sampling, decode_video, sample_indices
from vlmserve.shared.models import checkpoint_spec
from vlmserve.shared.models.spec import read_json
from vlmserve.shared.models.video import video_frame_size
from vlmserve.workers.demo_qwen3_vl import build_qwen3_vl

WIDTH, HEIGHT = 96, 64  # multiples of 32 within the demo's video bounds: no resizing
PADS = ("<|image_pad|>", "<|video_pad|>")
REALCONFIGS = os.path.join(os.path.dirname(__file__), "data", "realconfigs")


def processor_indices(total: int, native_fps: float, fps: float, max_frames: int) -> list[int]:
    """Qwen3VLVideoProcessor.sample_frames itself, on a stand-in with its defaults (fps 2,
    min_frames 4) and the server's max_frames."""
    stand_in = types.SimpleNamespace(fps=2, min_frames=4, max_frames=max_frames)
    metadata = VideoMetadata(total_num_frames=total, fps=native_fps)
    return Qwen3VLVideoProcessor.sample_frames(stand_in, metadata, fps=fps).tolist()


def processor_video_text(grid: list[int], indices: list[int], native_fps: float) -> str:
    """Qwen3VLProcessor.replace_video_token itself (timestamps, vision start/end per temporal
    patch), on a stand-in with the demo's merge and temporal patch sizes."""
    stand_in = types.SimpleNamespace(
        video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    stand_in._calculate_timestamps = types.MethodType(
        Qwen3VLProcessor._calculate_timestamps, stand_in
    )
    metadata = VideoMetadata(total_num_frames=8, fps=native_fps, frames_indices=list(indices))
    inputs = {"video_grid_thw": torch.tensor([grid]), "video_metadata": [metadata]}
    return Qwen3VLProcessor.replace_video_token(stand_in, inputs, 0)


def test_sampling_sizing_and_prompt(tmp_path) -> None:  # noqa: ANN001
    """Sampling, frame sizes and the video's prompt text equal transformers' for Qwen3-VL."""
    for total, native in ((8, 4.0), (30, 10.0), (100, 30.0), (3, 4.0)):
        for fps in (0.5, 1.0, 2.0, 2.5, 4.0):
            for max_frames in (32, 6):
                sampling = Sampling(fps, max_frames, 2, 60, 10**6, linspace=True)
                want = processor_indices(total, native, fps, max_frames)
                assert sample_indices(total, native, sampling) == want, (total, native, fps)
    clip = make_clip(width=WIDTH, height=HEIGHT)  # 8 frames at 4 fps
    sampling = Sampling(2.5, 32, 2, 60, 10**6, linspace=True)
    video = decode_video(clip, sampling)
    assert video.indices == processor_indices(8, 4.0, 2.5, 32)
    assert video.native_fps == 4.0
    np.testing.assert_array_equal(video.frames, all_frames(clip)[video.indices])
    # The whole video within the pixel bounds: up and down, odd frame counts, thin frames.
    for frames, height, width in ((4, 64, 96), (5, 56, 84), (32, 720, 1280), (2, 20, 300)):
        for low, high in ((4096, 262144), (4096, 25165824), (128 * 1024, 768 * 1024)):
            size = {"shortest_edge": low, "longest_edge": high}
            want = smart_resize(frames, height, width, 2, 32, low, high)
            assert video_frame_size(frames, height, width, size, 32, 2) == want
    # The prompt: transformers' text for the video, the span from first to last placeholder.
    model_dir = build_qwen3_vl(str(tmp_path / "ckpt"))
    images = checkpoint_spec(model_dir).image_processor(model_dir)
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what<|im_end|>\n"
    ids, placed = images.process(text, [], [video])
    grid = [3, HEIGHT // 16, WIDTH // 16]  # 5 frames: 3 temporal patches, the last repeated
    expanded = text.replace("<|video_pad|>", processor_video_text(grid, video.indices, 4.0))
    assert ids == images.tokenizer(expanded)["input_ids"]
    assert placed[0].arrays["video_grid_thw"].tolist() == [grid]
    pads = [i for i, t in enumerate(ids) if t == images.video_token_id]
    assert (placed[0].offset, placed[0].length) == (pads[0], pads[-1] + 1 - pads[0])
    assert len(pads) == 3 * grid[1] * grid[2] // 4


def reference_greedy(model_dir: str, cases: list[tuple[list[dict], list, list]]) -> list:
    """transformers' (prompt tokens, greedy tokens) for chats (messages, videos as (frames,
    indices, native fps), images)."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ip = transformers.AutoImageProcessor.from_pretrained(model_dir)
    out = []
    for messages, videos, images in cases:
        text = chat_text(tokenizer, messages)
        inputs: dict = {}
        if images:
            inputs |= dict(ip(images=images, return_tensors="pt"))
        image_grids = iter(inputs.get("image_grid_thw", []))
        per = [reference_video(frames, ip) for frames, _, _ in videos]
        if per:
            inputs["pixel_values_videos"] = torch.cat([v["pixel_values_videos"] for v in per])
            inputs["video_grid_thw"] = torch.cat([v["video_grid_thw"] for v in per])
        clips = iter(zip(per, videos, strict=True))
        pieces = []
        for piece in re.split(f"({re.escape(PADS[0])}|{re.escape(PADS[1])})", text):
            if piece == PADS[0]:
                piece = piece * (int(next(image_grids).prod()) // 4)
            elif piece == PADS[1]:
                arrays, (_, indices, native_fps) = next(clips)
                grid = arrays["video_grid_thw"][0].tolist()
                piece = processor_video_text(grid, indices, native_fps)
            pieces.append(piece)
        assert next(clips, None) is None, "the chat template wrote fewer videos than given"
        ids = tokenizer("".join(pieces), return_tensors="pt")["input_ids"]
        out.append(greedy_ids(model, ids, inputs))
    return out


def image() -> Image.Image:
    return Image.linear_gradient("L").resize((40, 60)).convert("RGB")


def video_part(url: str, **fields: object) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **fields}}


def test_qwen3_vl_video_matches_transformers(tmp_path) -> None:  # noqa: ANN001
    """A video alone (data: URL, the default 2 fps), an image and two videos (local file at
    2.5 fps: an odd frame count; http at 4 fps, at most 6 frames) like transformers generate,
    first all in flight at once (one encoder batch, videos of different lengths), then one at a
    time from the caches with the third sampled by mm_processor_kwargs; 19-token steps and
    4-token blocks, so prefill chunks and cached prefixes end inside videos, between temporal
    patches' timestamps. A one-frame video (under the temporal patch, which transformers
    refuses too) is a 400 and the server keeps serving."""
    model_dir = build_qwen3_vl(str(tmp_path / "ckpt"))
    clip = make_clip(width=WIDTH, height=HEIGHT)  # 8 frames at 4 fps
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(clip)
    frames = all_frames(clip)

    def sampled(fps: float, max_frames: int = 8) -> tuple[np.ndarray, list[int], float]:
        indices = processor_indices(len(frames), 4.0, fps, max_frames)
        return frames[indices], indices, 4.0

    cases = [  # (messages with URL keys, references' videos, images)
        ([{"role": "user", "content": [video_part("DATA"),
                                       {"type": "text", "text": "what moves"}]}],
         [sampled(2.0)], []),
        ([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image())}},
            {"type": "text", "text": "and in the clip"}, video_part("FILE", fps=2.5),
            {"type": "text", "text": "or this one"}, video_part("HTTP", fps=4, max_frames=6)]}],
         [sampled(2.5), sampled(4.0, 6)], [image()]),
        ([{"role": "user", "content": [video_part("HTTP"),  # fps 4, max 6 by the request
                                       {"type": "text", "text": "first frames"}]}],
         [sampled(4.0, 6)], []),
    ]  # fmt: skip
    expected = reference_greedy(model_dir, cases)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = local_config(
        model_dir, tmp_path, allowed_media_domains="127.0.0.1",
        allowed_local_media_path=str(media), num_kv_blocks=256, block_size=4,
        max_batched_tokens=19, max_batch_size=4, video_max_frames=8,
    )  # fmt: skip
    with file_server(str(media)) as base, server(config, str(tmp_path / "server.log")) as srv:
        urls = {"DATA": video_data_url(clip), "FILE": "clip.mp4", "HTTP": f"{base}/clip.mp4"}
        for messages, _, _ in cases:
            for part in messages[0]["content"]:
                if part["type"] == "video_url":
                    part["video_url"]["url"] = urls[part["video_url"]["url"]]

        # In flight at once: the third request's sampling in its part (greedy_chats sends no
        # request-wide fields).
        at_once = [messages for messages, _, _ in cases]
        at_once[2] = [{"role": "user", "content": [
            video_part(urls["HTTP"], fps=4, max_frames=6),
            {"type": "text", "text": "first frames"}]}]  # fmt: skip
        for i, reply in enumerate(greedy_chats(srv["url"], at_once, MAX_NEW)):
            check_reply(tokenizer, f"in flight, request {i}", reply, expected[i])
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            one_frame = [video_part(video_data_url(make_clip(frames=1, width=WIDTH, height=64)))]
            client.chat.completions.create(
                model="ckpt", max_tokens=4, temperature=0,
                messages=[{"role": "user", "content": [*one_frame, {"type": "text", "text": "a"}]}],
            )  # fmt: skip
        assert "at least 2 frames" in err.value.body["message"], err.value.body
        fields = {2: {"mm_processor_kwargs": {"fps": 4, "max_frames": 6}}}
        for i, (messages, _, _) in enumerate(cases):
            reply = client.chat.completions.create(
                model="ckpt", messages=messages, max_tokens=MAX_NEW, temperature=0,
                extra_body=fields.get(i),
            )  # fmt: skip
            check_reply(tokenizer, f"one at a time (cached), request {i}", reply, expected[i])


def test_real_config_video_matches_transformers(tmp_path) -> None:  # noqa: ANN001
    """A tiny checkpoint from Qwen3-VL-8B-Instruct's published files (its chat template, its
    video_preprocessor_config.json's size) serves a video alone and one beside an image like
    transformers generate, in flight together."""
    from vlmserve.workers.demo_real import build_from_config

    published = os.path.join(REALCONFIGS, "Qwen__Qwen3-VL-8B-Instruct")
    model_dir = build_from_config(published, str(tmp_path / "ckpt"))
    images = checkpoint_spec(model_dir).image_processor(model_dir)
    assert (
        images.video_size
        == read_json(os.path.join(published, "video_preprocessor_config.json"))["size"]
    )
    clip = make_clip(width=WIDTH, height=HEIGHT)  # 8 frames at 4 fps, no resizing
    frames = all_frames(clip)
    default = processor_indices(len(frames), 4.0, 2.0, 32)
    every = processor_indices(len(frames), 4.0, 4.0, 32)
    cases = [
        ([{"role": "user", "content": [video_part(video_data_url(clip)),
                                       {"type": "text", "text": "what moves"}]}],
         [(frames[default], default, 4.0)], []),
        ([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image())}},
            video_part(video_data_url(clip), fps=4), {"type": "text", "text": "compare"}]}],
         [(frames[every], every, 4.0)], [image()]),
    ]  # fmt: skip
    expected = reference_greedy(model_dir, cases)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = local_config(model_dir, tmp_path, num_kv_blocks=256, block_size=4)
    with server(config, str(tmp_path / "server.log")) as srv:
        replies = greedy_chats(srv["url"], [messages for messages, _, _ in cases], MAX_NEW)
    for i, (reply, want) in enumerate(zip(replies, expected, strict=True)):
        check_reply(tokenizer, f"request {i}", reply, want)
