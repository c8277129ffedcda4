"""Video input for Qwen2-VL and Qwen2.5-VL (`video_url` content parts).

A clip of moving shapes is made here and encoded with PyAV (H.264 in MP4, in memory). The
reference decodes the same bytes with PyAV on its own, takes the frames transformers' video
processor would sample, builds `pixel_values_videos` the way that processor does (rescale,
normalize, frames grouped by the temporal patch; the frames need no resizing) and runs
transformers `generate` on them; the server must give the same tokens and prompt length.
Broken, too long and too large videos are 400s naming the problem, and the server keeps serving.
"""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import openai
import pytest
import torch
import transformers
from PIL import Image
from server_fixtures import file_server, local_config
from vlm_reference import data_url

from vlmserve.deploy.launcher import server
from vlmserve.frontend.video import Sampling, decode_video, sample_indices
from vlmserve.shared.models.video import video_patches
from vlmserve.workers.demo_vlm import build_qwen2_vl

MAX_NEW = 10
WIDTH, HEIGHT = 84, 56  # multiples of 28 within the demo's pixel bounds: no resizing


def make_clip(
    frames: int = 8, fps: int = 4, noise: bool = False, width: int = WIDTH, height: int = HEIGHT
) -> bytes:
    """An MP4 (H.264) of a red square moving right over a green-blue gradient and a white
    bar moving down; with `noise`, random pixels (which compress badly: a large file)."""
    rng = np.random.default_rng(1)
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.zeros((height, width, 3), dtype=np.uint8)
            img[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None]
            img[..., 2] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
            x = 4 + 8 * i
            img[10:26, x : x + 16] = (230, 20, 20)
            y = 4 + 5 * i
            img[y : y + 6, 50:80] = 255
            if noise:
                img = rng.integers(0, 256, img.shape, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return out.getvalue()


def video_data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def all_frames(data: bytes) -> np.ndarray:
    """Every frame of the clip, decoded by PyAV here (not by the server's code)."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def processor_sampling(total: int, native_fps: float, fps: float) -> list[int]:
    """The frames Qwen2VLVideoProcessor.sample_frames picks for `fps` (temporal patch 2,
    min_frames 4): n = total / native_fps * fps, clamped, rounded down to even; arange."""
    n = min(max(total / native_fps * fps, 4), total)
    n = int(n // 2 * 2)
    return torch.arange(0, total, total / n).int().tolist()


def reference_video(frames: np.ndarray, image_processor) -> dict:  # noqa: ANN001
    """pixel_values_videos and video_grid_thw as transformers' Qwen2VLVideoProcessor makes
    them for frames that need no resizing: x / 255, normalized, the last frame repeated to an
    even count, patches in (t, row block, column block, row, column) order, each patch
    flattened as (channel, time, y, x)."""
    p, m, tp = image_processor.patch_size, image_processor.merge_size, 2
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [T, C, H, W]
    x = (x / 255.0 - mean) / std
    if len(x) % tp:
        x = torch.cat([x, x[-1:].expand(tp - len(x) % tp, -1, -1, -1)])
    t, c, h, w = len(x) // tp, 3, x.shape[2] // p, x.shape[3] // p
    x = x.reshape(t, tp, c, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return {
        "pixel_values_videos": x.reshape(t * h * w, c * tp * p * p),
        "video_grid_thw": torch.tensor([[t, h, w]]),
    }


def test_sampling_and_decoding() -> None:
    clip = make_clip()  # 8 frames at 4 fps
    frames = all_frames(clip)
    sampling = Sampling(fps=2.0, max_frames=32, multiple=2, max_seconds=60, max_pixels=10**6)
    assert sample_indices(8, 4.0, sampling) == processor_sampling(8, 4.0, 2.0) == [0, 2, 4, 6]
    for fps in (0.5, 1.0, 3.0, 4.0):  # below MIN_FRAMES, odd counts, every frame
        slow = Sampling(fps=fps, max_frames=32, multiple=2, max_seconds=60, max_pixels=10**6)
        assert sample_indices(8, 4.0, slow) == processor_sampling(8, 4.0, fps), fps
        assert sample_indices(30, 10.0, slow) == processor_sampling(30, 10.0, fps), fps
    video = decode_video(clip, sampling)
    np.testing.assert_array_equal(video.frames, frames[[0, 2, 4, 6]])
    assert video.fps == 2.0
    capped = Sampling(fps=4.0, max_frames=6, multiple=2, max_seconds=60, max_pixels=10**6)
    assert sample_indices(8, 4.0, capped) == [0, 1, 2, 4, 5, 6]
    # a clip shorter than one temporal patch keeps its one frame (the processor repeats it)
    assert sample_indices(1, 4.0, sampling) == [0]
    other = decode_video(clip, capped)
    assert other.hash != video.hash  # the caches key on the sampled frames and their rate


@pytest.mark.parametrize("frames", [4, 3])
def test_video_patches_match_transformers_layout(tmp_path, frames: int) -> None:  # noqa: ANN001
    model_dir = build_qwen2_vl(str(tmp_path / "ckpt"))
    ip = transformers.AutoImageProcessor.from_pretrained(model_dir)
    clip = all_frames(make_clip())[:frames]
    patches, grid = video_patches(ip, clip, {"shortest_edge": 3136, "longest_edge": 50176})
    ref = reference_video(clip, ip)
    assert grid.tolist() == ref["video_grid_thw"].tolist() == [[2, 4, 6]]
    torch.testing.assert_close(torch.from_numpy(patches), ref["pixel_values_videos"])


def reference_greedy(
    model_dir: str, cases: list[tuple[list[dict], list[tuple[np.ndarray, float]], list]]
) -> list[tuple[int, list[int]]]:
    """transformers' (prompt tokens, greedy tokens) for chats (messages, videos as (sampled
    frames, sampled fps), images)."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    return [greedy_one(model_dir, model.eval(), *case) for case in cases]


def greedy_one(
    model_dir: str,
    model,
    messages: list[dict],
    videos: list,
    images: list,  # noqa: ANN001
    **image_kwargs: int,
) -> tuple[int, list[int]]:
    """transformers' (prompt tokens, greedy tokens); `image_kwargs` go to its image processor
    (a request's min_pixels / max_pixels)."""
    config = model.config
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ip = transformers.AutoImageProcessor.from_pretrained(model_dir)
    text = chat_text(tokenizer, messages)
    inputs: dict = {}
    counts = {"<|image_pad|>": [], "<|video_pad|>": []}
    if images:
        inputs |= dict(ip(images=images, return_tensors="pt", **image_kwargs))
        counts["<|image_pad|>"] = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    if videos:
        per = [reference_video(frames, ip) for frames, _ in videos]
        inputs["pixel_values_videos"] = torch.cat([v["pixel_values_videos"] for v in per])
        inputs["video_grid_thw"] = torch.cat([v["video_grid_thw"] for v in per])
        counts["<|video_pad|>"] = [int(g.prod()) // 4 for g in inputs["video_grid_thw"]]
        if "Qwen2_5" in config.architectures[0]:
            inputs["second_per_grid_ts"] = torch.tensor([2 / fps for _, fps in videos])
    for pad, sizes in counts.items():
        parts = text.split(pad)
        assert len(parts) == len(sizes) + 1
        text = parts[0] + "".join(pad * n + rest for n, rest in zip(sizes, parts[1:], strict=True))
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return greedy_ids(model, ids, inputs)


def chat_text(tokenizer, messages: list[dict]) -> str:  # noqa: ANN001
    """The chat template's text for OpenAI-style messages (image_url / video_url parts as the
    template's image / video)."""
    turns = [
        {"role": m["role"], "content": [{"type": p["type"].removesuffix("_url")}
                                        if p["type"] != "text" else p for p in m["content"]]}
        for m in messages
    ]  # fmt: skip
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def greedy_ids(model, ids: torch.Tensor, inputs: dict) -> tuple[int, list[int]]:  # noqa: ANN001
    """transformers generate's (prompt tokens, greedy tokens) for prompt `ids` [1, tokens] and
    the processor's arrays."""
    config = model.config
    mm = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
            max_new_tokens=MAX_NEW, do_sample=False, **inputs,
        )  # fmt: skip
    return ids.shape[1], out[0, ids.shape[1] :].tolist()


def image() -> Image.Image:
    return Image.linear_gradient("L").resize((40, 60)).convert("RGB")


def video_part(url: str, **fields: object) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **fields}}


@pytest.mark.parametrize("v2_5", [False, True], ids=["qwen2_vl", "qwen2_5_vl"])
def test_video_matches_transformers(tmp_path, v2_5: bool) -> None:  # noqa: ANN001
    """Three video requests (alone by data: URL at the default 2 fps; beside an image, from a
    local file at 4 fps; by http with fps and max_frames in mm_processor_kwargs) like
    transformers, twice (the second time
    from the encoder and prefix caches); 19- and 7-token steps and 4-token blocks, so prefill
    chunks and cached prefixes end inside videos. Between the rounds, on Qwen2-VL, bad videos
    are refused with 400s and the second round shows the server still serving."""
    model_dir = build_qwen2_vl(str(tmp_path / "ckpt"), v2_5=v2_5)
    clip = make_clip()
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(clip)
    frames = all_frames(clip)
    every = processor_sampling(8, 4.0, 4.0)  # fps 4: all 8 frames
    half = processor_sampling(8, 4.0, 2.0)  # the server's default --video-fps 2
    cases = [  # (messages with URL keys, references' videos, images)
        ([{"role": "user", "content": [video_part("DATA"),
                                       {"type": "text", "text": "what moves"}]}],
         [(frames[half], 2.0)], []),
        ([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image())}},
            {"type": "text", "text": "and in the clip"}, video_part("FILE", fps=4)]}],
         [(frames[every], 4.0)], [image()]),
        ([{"role": "user", "content": [video_part("HTTP"),  # sampled by mm_processor_kwargs
                                       {"type": "text", "text": "first frames"}]}],
         [(frames[[0, 2, 4, 6]], 2.0)], []),
    ]  # fmt: skip
    expected = reference_greedy(model_dir, cases)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = local_config(
        model_dir, tmp_path, allowed_media_domains="127.0.0.1",
        allowed_local_media_path=str(media), num_kv_blocks=256, block_size=4,
        max_batched_tokens=7 if v2_5 else 19, max_batch_size=4, video_max_seconds=5.0,
        video_max_bytes=len(clip) * 3 // 2, video_max_frames=8,
    )  # fmt: skip
    with file_server(str(media)) as base, server(config, str(tmp_path / "server.log")) as srv:
        urls = {"DATA": video_data_url(clip), "FILE": "clip.mp4", "HTTP": f"{base}/clip.mp4"}
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        for round_ in ("first", "cached"):
            for i, ((messages, vids, _), (prompt_len, tokens)) in enumerate(
                zip(cases, expected, strict=True)
            ):
                for part in messages[0]["content"]:
                    if part["type"] == "video_url" and part["video_url"]["url"] in urls:
                        part["video_url"]["url"] = urls[part["video_url"]["url"]]
                reply = client.chat.completions.create(
                    model="ckpt", messages=messages, max_tokens=MAX_NEW, temperature=0,
                    extra_body=REQUEST_FIELDS.get(i),
                )  # fmt: skip
                label = f"{round_} round, request {i} ({len(vids[0][0])} frames)"
                check_reply(tokenizer, label, reply, (prompt_len, tokens))
            if round_ == "first" and not v2_5:
                refuse_bad_videos(client, clip)


# vLLM's request-wide processor settings, for the third request (its part sets none).
REQUEST_FIELDS = {2: {"mm_processor_kwargs": {"fps": 4, "max_frames": 4}}}


def check_reply(tokenizer, label: str, reply, want: tuple[int, list[int]]) -> None:  # noqa: ANN001
    """The server's reply has transformers' (prompt tokens, greedy tokens) `want`: exact usage,
    and the text, failing with the first differing character."""
    prompt_len, tokens = want
    assert reply.usage.prompt_tokens == prompt_len, label
    assert reply.usage.completion_tokens == len(tokens), label
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    got = reply.choices[0].message.content
    assert got == text, (
        f"{label}: {got!r} differs from transformers' greedy {text!r} (tokens {tokens}) from "
        f"character {first_difference(got, text)}"
    )


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def refuse_bad_videos(client: openai.OpenAI, clip: bytes) -> None:
    """Corrupt, truncated, non-video, too long, too large and over-sampled videos, wrong data:
    types and paths outside the allowed directory are 400s naming the problem."""
    big = make_clip(noise=True)
    assert len(big) > 2 * len(clip)
    corrupt = clip[:48] + bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8))
    bad = [
        (video_part(video_data_url(corrupt)), "not a video"),
        (video_part(video_data_url(clip[:-200])), "truncated or corrupt"),
        (video_part(video_data_url(b"not a video at all" * 20)), "not a video"),
        (video_part(video_data_url(make_clip(frames=8, fps=1))), "8.0 s long"),
        (video_part(video_data_url(big)), "--video-max-bytes"),
        (video_part(video_data_url(clip), max_frames=9), "--video-max-frames"),
        (video_part("data:image/png;base64," + base64.b64encode(clip).decode()), "data:video/"),
        (video_part("../../etc/passwd"), "outside the directory"),
    ]
    fine = video_part(video_data_url(clip))
    bad_fields = [  # (request fields, param, gist)
        ({"mm_processor_kwargs": {"do_resize": False}}, "mm_processor_kwargs", "do_resize"),
        ({"mm_processor_kwargs": {"fps": 0}}, "mm_processor_kwargs.fps", ">"),
        ({"mm_processor_kwargs": {"max_frames": 9}}, "messages", "--video-max-frames"),
    ]
    for part, extra, param, gist in [(p, {}, "messages", g) for p, g in bad] + [
        (fine, *b) for b in bad_fields
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="ckpt", max_tokens=4, temperature=0, extra_body=extra,
                messages=[{"role": "user", "content": [part, {"type": "text", "text": "what"}]}],
            )  # fmt: skip
        assert err.value.body["param"] == param, err.value.body
        assert gist.lower() in err.value.body["message"].lower(), err.value.body["message"]
