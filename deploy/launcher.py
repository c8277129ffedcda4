"""Starts vlmserve's processes as children: the scheduler, the workers and the frontends.

Used by `vlmserve serve api_server`, by the tests and by the benchmarks, so all of them
start the very same processes a Procfile or systemd units start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import msgspec

from vlmserve.shared.config import Config, config_to_env, new_run_id

# Past --drain-timeout, what a frontend may still need to end its last requests and exit.
DRAIN_MARGIN_S = 15.0

log = logging.getLogger("vlmserve.launcher")


def spawn(role: str, config: Config, log_path: str | None = None) -> subprocess.Popen:
    """`vlmserve ROLE` in a child process reading `config` from its environment; its output
    goes to `log_path`, or to ours when None."""
    env = {**os.environ, **config_to_env(config), "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - the child writes to it
    return subprocess.Popen(
        [sys.executable, "-m", "vlmserve", role],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
    )


def stop(proc: subprocess.Popen, timeout: float = 10.0, name: str = "") -> int:
    """SIGTERM, then SIGKILL past `timeout`; logs how the child ended and how long it took, so
    a slow shutdown shows which process held it up."""
    if proc.poll() is None:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) still running %.0fs after SIGTERM; killing it",
                        name or "child", proc.pid, timeout)  # fmt: skip
            proc.kill()
            proc.wait()
        took = time.monotonic() - started
        log.info("%s (pid %d) exited with code %s after %.1fs",
                 name or "child", proc.pid, proc.returncode, took)  # fmt: skip
    return proc.returncode


def start_scheduler_and_workers(
    config: Config, log_path: str | None
) -> dict[str, subprocess.Popen]:
    """The scheduler and one worker per tensor-parallel rank."""
    procs = {"scheduler": spawn("scheduler", config, log_path)}
    for rank in range(config.tp):
        rank_config = msgspec.structs.replace(config, rank=rank)
        procs[f"worker{rank}"] = spawn("worker", rank_config, log_path)
    return procs


@contextlib.contextmanager
def scheduler_and_workers(model_dir: str, workdir: str, **settings: object) -> Iterator[dict]:
    """Run a scheduler and `tp` workers; yield their config and processes; stop them after."""
    config = Config(model=model_dir, run_id=new_run_id(), ipc_dir=workdir, **settings)
    log_path = os.path.join(workdir, f"scheduler-workers-{config.run_id}.log")
    procs = start_scheduler_and_workers(config, log_path)
    try:
        yield {"config": config, "procs": procs, "log": log_path}
    finally:
        for name, proc in procs.items():
            stop(proc, name=name)


def resolve_model(model: str) -> str:
    """A local checkpoint directory as is; otherwise a Hugging Face hub id, downloaded (or
    found in the local hub cache) with huggingface_hub."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model)
    except Exception as exc:  # offline, unknown repo, no access: all end the launch
        raise SystemExit(
            f"{model!r} is no local directory and could not be fetched: {exc}"
        ) from exc


def wait_healthy(url: str, procs: dict[str, subprocess.Popen], timeout: float) -> None:
    """Poll /health until it answers 200; fail if a child exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} during startup")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not healthy after {timeout:.0f}s")


@contextlib.contextmanager
def server(config: Config, log_path: str | None = None) -> Iterator[dict]:
    """Scheduler, workers and the Gunicorn frontends; yields the URL once /health is 200."""
    procs = start_scheduler_and_workers(config, log_path)
    procs["frontend"] = spawn("frontend", config, log_path)
    host = "127.0.0.1" if config.server_name in ("0.0.0.0", "::") else config.server_name
    url = f"http://{host}:{config.server_port}"
    try:
        wait_healthy(url, procs, timeout=config.start_timeout)
        yield {"url": url, "procs": procs, "config": config}
    finally:
        # Frontends first: they drain (finish what they hold, 503 to anything new, for at
        # most --drain-timeout), then the engine stops with nothing left in flight.
        stop(procs["frontend"], timeout=config.drain_timeout + DRAIN_MARGIN_S, name="frontend")
        for name in [n for n in procs if n != "frontend"]:
            stop(procs[name], name=name)
