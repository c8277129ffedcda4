"""Helpers for end-to-end tests of the real server (all processes, real sockets)."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import torch
import transformers
from hf_reference import hf_greedy

from vlmserve.shared.config import Config, new_run_id


def local_config(model: str, workdir: str, **settings: object) -> Config:
    """A server's Config for a test: its own run id and sockets, loopback, a free port."""
    base = dict(
        model=model, run_id=new_run_id(), ipc_dir=str(workdir), server_name="127.0.0.1",
        server_port=free_port(), log_level="WARNING",
    )  # fmt: skip
    return Config(**(base | settings))


def engine_greedy(model_dir: str, workdir: str, prompts: list[list[int]], max_new: int) -> list:
    """The engine's greedy tokens for token-id prompts, all in flight at once, through a
    scheduler and a worker (no frontend: no tokenizer or processor needed)."""
    from vlmserve.deploy.launcher import scheduler_and_workers
    from vlmserve.frontend.offline import run_requests
    from vlmserve.shared.messages import SamplingParams

    greedy = SamplingParams(max_tokens=max_new, temperature=0.0)
    with scheduler_and_workers(model_dir, workdir, block_size=16, num_kv_blocks=64) as eng:
        results, _ = run_requests(eng["config"], [(p, greedy) for p in prompts])
    for res in results:
        assert res.error is None, res.error
    return [res.token_ids for res in results]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def file_server(root: str) -> Iterator[str]:
    """Serve the files under `root` over http on 127.0.0.1; yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003
            super().__init__(*args, directory=root, **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):  # noqa: ANN001, ANN201
    """Poll `predicate` until it returns something truthy; fail loudly after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: last {value!r}")


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics samples: each series by its name with labels (`name{a="b"}`),
    and each name alone with the sum of its series (buckets excepted)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        values[series] = float(value)
        name = series.split("{", 1)[0]
        if "{" in series and not name.endswith("_bucket"):
            values[name] = values.get(name, 0.0) + float(value)
    return values


def labelled(m: dict[str, float], name: str, **labels: str) -> float:
    """The sum of `name`'s series that carry all of `labels` (in any order)."""
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    return sum(
        value
        for series, value in m.items()
        if series.startswith(name + "{") and wanted <= set(series[len(name) + 1 : -1].split(","))
    )


class ChatReference:
    """What transformers generates greedily for a chat, tokenized as the model's processor does
    (the tokenizer's own BOS, then the rendered template)."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text)["input_ids"]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return [tokens for tokens, _ in hf_greedy(self.model_dir, prompts, max_new_tokens)]

    def text(self, token_ids: list[int]) -> str:
        eos = self.tokenizer.eos_token_id
        return self.tokenizer.decode([t for t in token_ids if t != eos], skip_special_tokens=True)


torch.set_num_threads(1)  # the server's processes need the cores more than the test does
