"""One request's bad image fails that request alone: the vision tower raising on its arrays
ends it with a 400-style rejection while the requests in flight beside it finish with the
answers they get without it, and the next requests are served.

The failure is injected the way a faulty or hostile frontend would send it: a real Submit over
the scheduler's real socket, whose pixel arrays the tower cannot take (the frontend's own
processor never makes such arrays)."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import openai
from PIL import Image
from server_fixtures import local_config
from vlm_reference import data_url

from vlmserve.deploy.launcher import server
from vlmserve.frontend.prompts import Prompter
from vlmserve.frontend.scheduler_client import SchedulerClient
from vlmserve.shared.arrays import to_frames
from vlmserve.shared.messages import ERROR, ImageMeta, SamplingParams
from vlmserve.workers.demo_vlm import build_llava

MAX_NEW = 6


def _chat(colour: tuple[int, int, int]) -> list[dict]:
    url = data_url(Image.new("RGB", (40, 30), colour))
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "what colour"}]}]  # fmt: skip


def _bad_submission(model_dir: str) -> tuple[list[int], list[ImageMeta], list]:
    """A prompt with one image placed as the processor places it, but pixel arrays of a size
    the CLIP tower refuses (10x10 instead of its 28x28)."""
    import msgspec

    from vlmserve.frontend.schemas import ChatMessage

    prompter = Prompter(model_dir, 4096)
    messages = msgspec.convert(
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"},
                                      {"type": "text", "text": "what colour"}]}],
        list[ChatMessage],
    )  # fmt: skip
    ids, [image] = prompter.chat_inputs(messages, [Image.new("RGB", (40, 30), (1, 2, 3))])
    metas, frames = to_frames({"pixel_values": np.zeros((1, 3, 10, 10), np.float32)})
    return ids, [ImageMeta("bad-image", image.offset, image.length, metas)], frames


async def _submit_bad(config, model_dir: str) -> list:  # noqa: ANN001
    ids, images, frames = _bad_submission(model_dir)
    client = SchedulerClient(config)
    await client.start(30)
    try:
        assert await client.ready(30), "the engine did not answer"
        sampling = SamplingParams(temperature=0, max_tokens=MAX_NEW)
        return [out async for out in client.generate("bad-1", ids, sampling, images, frames)]
    finally:
        await client.close()


def test_a_bad_image_fails_its_request_alone(tmp_path) -> None:  # noqa: ANN001
    model_dir = build_llava(str(tmp_path / "llava"))
    config = local_config(model_dir, str(tmp_path), num_kv_blocks=256)
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    with server(config, os.path.join(str(tmp_path), "server.log")) as srv:

        async def scenario() -> tuple[list[str], list[str], list, list[str]]:
            client = openai.AsyncOpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)

            async def ask(colour: tuple[int, int, int]) -> str:
                reply = await client.chat.completions.create(
                    model="llava", messages=_chat(colour), max_tokens=MAX_NEW, temperature=0
                )
                return reply.choices[0].message.content

            expected = list(await asyncio.gather(*(ask(c) for c in colours)))
            *good, bad = await asyncio.gather(
                *(ask(c) for c in colours), _submit_bad(config, model_dir)
            )
            after = list(await asyncio.gather(*(ask(c) for c in colours)))
            await client.close()
            return expected, good, bad, after

        expected, good, bad, after = asyncio.run(scenario())
    assert bad[-1].finish_reason == ERROR and bad[-1].rejected, bad
    assert "could not take this request's image" in bad[-1].error, bad[-1].error
    assert good == expected, "the requests beside the bad one must not change"
    assert after == expected, "the server must go on serving"
