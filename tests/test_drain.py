"""Graceful drain: SIGTERM to `vlmserve serve api_server` (the launcher) with 16 streams in
flight. The frontends (two Gunicorn workers) stop taking requests (/health and new requests
get 503), the 16 streams run to their end (finish_reason "length", then [DONE]), and every
process exits, the launcher with 0, well within --drain-timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
from server_fixtures import free_port, wait_for

from vlmserve.shared.config import new_run_id

# Long enough that no stream can end before SIGTERM is handled (CI's idle machine ran 100
# tokens out first), short enough to finish well within the drain timeout on a loaded one.
STREAMS, MAX_TOKENS = 16, 400
DRAIN_TIMEOUT = 60.0


def stream_completion(url: str, i: int, first: threading.Event, out: dict) -> None:
    payload = {"prompt": f"drain me {i}", "max_tokens": MAX_TOKENS, "temperature": 0,
               "ignore_eos": True, "stream": True}  # fmt: skip
    lines = []
    with httpx.stream("POST", url + "/v1/completions", json=payload, timeout=60) as resp:
        out["status"] = resp.status_code
        for line in resp.iter_lines():
            if line:
                lines.append(line)
                first.set()
    out["lines"] = lines


def test_sigterm_drains_16_streams_then_exits_0(checkpoints: dict, workdir: str) -> None:
    port, run_id = free_port(), new_run_id()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(workdir, "launcher.log")
    argv = [sys.executable, "-m", "vlmserve", "serve", "api_server", checkpoints["llama"],
            "--server-name", "127.0.0.1", "--server-port", str(port), "--run-id", run_id,
            "--ipc-dir", workdir, "--device", "cpu", "--frontend-workers", "2",
            "--max-batch-size", str(STREAMS), "--num-kv-blocks", "512",
            "--drain-timeout", str(DRAIN_TIMEOUT), "--log-level", "INFO"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMSERVE_")}
    with open(log_path, "wb") as log:
        # A session of its own, so a failed test can kill every process it started.
        launcher = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for(lambda: launcher.poll() is None and _health(url) == 200, 120, "healthy")
        firsts = [threading.Event() for _ in range(STREAMS)]
        outs: list[dict] = [{} for _ in range(STREAMS)]
        threads = [
            threading.Thread(target=stream_completion, args=(url, i, firsts[i], outs[i]))
            for i in range(STREAMS)
        ]
        for t in threads:
            t.start()
        for event in firsts:
            assert event.wait(60), "a stream never started"

        launcher.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        wait_for(lambda: _health(url) == 503, 10, "/health 503 while draining")
        refused = httpx.post(url + "/v1/completions", json={"prompt": "late", "max_tokens": 2})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "shutting down" in refused.json()["error"]["message"]

        for t in threads:
            t.join(DRAIN_TIMEOUT)
        assert _exit_code(launcher, DRAIN_TIMEOUT, log_path) == 0, _tail(log_path)
        assert time.monotonic() - stopped_at < DRAIN_TIMEOUT
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    for i, out in enumerate(outs):
        assert out["status"] == 200 and out["lines"][-1] == "data: [DONE]", (i, out)
        chunks = [json.loads(line[len("data: ") :]) for line in out["lines"][:-1]]
        assert len(chunks) == MAX_TOKENS, (i, len(chunks))
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    log = _tail(log_path)
    assert "Traceback" not in log and "drained" in log, log
    # The frontends' own word that the drain began with streams in flight.
    with open(log_path, errors="replace") as f:
        said = re.findall(r"draining: (\d+) requests in flight", f.read())
    assert len(said) == 2 and sum(map(int, said)) > 0, log


def _exit_code(proc: subprocess.Popen, timeout: float, log_path: str) -> int:
    """The launcher's exit code; past `timeout`, fail with what still runs and the log."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        ps = subprocess.run(["ps", "-o", "pid,ppid,etime,stat,args", "-g", str(proc.pid)],
                            capture_output=True, text=True).stdout  # fmt: skip
        raise AssertionError(
            f"the launcher still runs {timeout:.0f}s after the streams ended\n"
            f"{ps}\n{_tail(log_path)}"
        ) from None


def _health(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=10).status_code
    except httpx.HTTPError:
        return 0


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-6000:]
