"""Starts vlmserve's processes as children: the engine (scheduler + workers) and frontends.

Used by `vlmserve serve api_server`, by the tests and by the benchmarks, so all of them
start the very same processes a Procfile or systemd units start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import msgspec

from shared.config import Config, config_to_env, new_run_id


def spawn(role: str, config: Config, log_path: str) -> subprocess.Popen:
    """`vlmserve ROLE` in a child process reading `config` from its environment."""
    env = {**os.environ, **config_to_env(config), "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it until it exits
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", role],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def engine(model_dir: str, workdir: str, **settings: object) -> Iterator[dict]:
    """Run a scheduler and `tp` workers; yield their config and processes; stop them after."""
    config = Config(model=model_dir, run_id=new_run_id(), ipc_dir=workdir, **settings)
    log_path = os.path.join(workdir, f"engine-{config.run_id}.log")
    procs = {"scheduler": spawn("scheduler", config, log_path)}
    for rank in range(config.tp):
        procs[f"worker{rank}"] = spawn(
            "worker", msgspec.structs.replace(config, rank=rank), log_path
        )
    try:
        yield {"config": config, "procs": procs, "log": log_path}
    finally:
        for proc in procs.values():
            stop(proc)


def read_log(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()
