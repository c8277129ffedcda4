"""Shared fixtures: tiny checkpoints built once per session, and a scratch directory."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny random-weight checkpoints by architecture, in Hugging Face format."""
    from vlmserve.workers.demo_checkpoint import ARCHES, build_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_checkpoint(str(root / arch), arch=arch) for arch in ARCHES}


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A short directory for ipc:// sockets (socket paths are limited to ~100 bytes)."""
    return str(tmp_path_factory.mktemp("run"))
