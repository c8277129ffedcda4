"""Small C libraries compiled on first use with the system C compiler and loaded with ctypes.

A library is built once per machine into torch's extensions cache dir (TORCH_EXTENSIONS_DIR,
else ~/.cache/torch_extensions): one build per source, flags, compiler and CPU (the flags may
hold -march=native, so the CPU's features are part of the key). No torch headers, so a build
takes a second or two. Built beside its final name and renamed, so processes compiling at
once never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable

log = logging.getLogger("vlmserve.cbuild")


def build_library(name: str, source: str, flags: list[str], what: str) -> str:
    """The path of `source` built as a shared library `name`.so, compiled into the extensions
    cache if not there yet (`what` names it in the log line). Raises RuntimeError when there
    is no compiler or the build fails, OSError or SubprocessError when the compiler cannot run."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    key = hashlib.sha256(
        "\n".join([source, " ".join(flags), version, platform.machine(), cpu_flags()]).encode()
    ).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    folder = os.path.join(root, f"{name}_{key}")
    path = os.path.join(folder, f"{name}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    log.info("compiling %s into %s (once per machine)", what, folder)
    source_path = os.path.join(folder, f"{name}.c")
    with open(source_path + f".{os.getpid()}", "w") as f:
        f.write(source)
    os.replace(source_path + f".{os.getpid()}", source_path)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, source_path, "-o", partial, "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip() or done.returncode}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def load_library(
    build: Callable[[], str], what: str, fallback: str, logger: logging.Logger
) -> ctypes.CDLL | None:
    """The library `build` returns the path of, loaded; None where there is no compiler or the
    build or the load fails, with one warning on `logger` naming `what` and the `fallback`
    that runs instead (a worker never fails for want of a kernel)."""
    try:
        return ctypes.CDLL(build())
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        logger.warning("%s could not be built (%s); %s", what, reason, fallback)
        return None


def cpu_flags() -> str:
    """This CPU's feature flags as /proc/cpuinfo lists them (else the processor's name)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()
