"""shared/config.py: every server setting is a Config field with a flag and a VLMSERVE_ variable."""

from __future__ import annotations

import os
import re

import pytest

from vlmserve.shared.config import Config, config_from_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("frontend", "scheduler", "workers", "shared", "deploy", "client.py", "__main__.py")
# Read from the environment outside Config on purpose: the terminal chat client's own key.
CLIENT_VARIABLES = {"VLMSERVE_API_KEY"}
ENV_READ = re.compile(r"""(?:environ\.get|environ\[|getenv)\(?\s*["'](VLMSERVE_\w+)["']""")


def _python_files() -> list[str]:
    paths = []
    for source in SOURCES:
        top = os.path.join(REPO, source)
        if os.path.isfile(top):
            paths.append(top)
        for root, _, files in os.walk(top):
            paths += [os.path.join(root, f) for f in files if f.endswith(".py")]
    return paths


def test_no_setting_is_read_from_the_environment_outside_config() -> None:
    # Config reads `ENV_PREFIX + field`; a literal VLMSERVE_ name elsewhere is a stray knob.
    stray = []
    for path in _python_files():
        with open(path) as f:
            for name in ENV_READ.findall(f.read()):
                if name not in CLIENT_VARIABLES:
                    stray.append(f"{os.path.relpath(path, REPO)} reads {name}")
    assert not stray, "settings belong in shared/config.py's Config:\n" + "\n".join(stray)


def test_startup_timeouts_come_from_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Config().worker_startup_timeout, Config().start_timeout) == (900.0, 900.0)
    monkeypatch.setenv("VLMSERVE_WORKER_STARTUP_TIMEOUT", "42.5")
    monkeypatch.setenv("VLMSERVE_START_TIMEOUT", "7")
    config = config_from_env()
    assert (config.worker_startup_timeout, config.start_timeout) == (42.5, 7.0)


@pytest.mark.parametrize("field", ["worker_startup_timeout", "start_timeout"])
def test_startup_timeouts_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be positive"):
        Config(**{field: 0})
