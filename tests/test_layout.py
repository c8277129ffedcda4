"""The package's shape: one import name, the process boundaries of the design, a torch-free
client. Checked on the source (every import statement) and in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["frontend", "scheduler", "workers", "shared", "deploy"]

# What each package may import of the others: frontend → shared ← scheduler, workers → shared;
# deploy starts the others as processes (and reaches into them only through their entry points).
ALLOWED = {
    "frontend": {"frontend", "shared", "client"},
    "scheduler": {"scheduler", "shared"},
    "workers": {"workers", "shared"},
    "shared": {"shared"},
    "deploy": {"deploy", "shared", "frontend", "scheduler", "workers", "client"},
    "client": set(),
}


def _modules(package: str) -> list[str]:
    base = os.path.join(ROOT, package)
    if package == "client":
        return [os.path.join(ROOT, "client.py")]
    return [
        os.path.join(folder, name)
        for folder, _, names in os.walk(base)
        for name in names
        if name.endswith(".py")
    ]


def _imported(path: str) -> set[str]:
    """Top-level names this file imports from: 'vlmserve.X...' gives X; anything else
    that is one of our folders' bare names is reported as such (an old-style import)."""
    tree = ast.parse(open(path).read(), path)
    found: set[str] = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "vlmserve" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] in PACKAGES:
                found.add("bare:" + parts[0])
    return found


@pytest.mark.parametrize("package", [*PACKAGES, "client"])
def test_imports_respect_process_boundaries(package: str) -> None:
    allowed = ALLOWED[package]
    bad = []
    for path in _modules(package):
        for name in _imported(path):
            if name.startswith("bare:") or (name in ALLOWED and name not in allowed):
                bad.append(f"{os.path.relpath(path, ROOT)} imports {name}")
    assert not bad, "imports across the design's process boundaries:\n" + "\n".join(bad)


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )


def test_client_and_scheduler_import_without_torch() -> None:
    code = (
        "import sys\n"
        "from vlmserve.client import APIClient, AsyncAPIClient\n"
        "import vlmserve.scheduler.scheduler, vlmserve.shared.messages\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = _fresh(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported {out.stdout.strip()} (the client must not)"


def test_python_dash_m_is_the_vlmserve_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vlmserve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "vlmserve serve api_server MODEL" in out.stdout


def _string_constants(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) is str}


def test_architecture_names_live_only_in_the_model_specs() -> None:
    from vlmserve.shared.models import supported_architectures

    names = set(supported_architectures())
    outside = []
    for package in [*PACKAGES, "client"]:
        for path in _modules(package):
            if os.path.relpath(path, ROOT).startswith(os.path.join("shared", "models")):
                continue
            found = names & _string_constants(path)
            outside += [f"{os.path.relpath(path, ROOT)}: {sorted(found)}"] if found else []
    assert not outside, "architecture names outside vlmserve.shared.models:\n" + "\n".join(outside)


def test_registry_refuses_an_unknown_architecture_naming_the_supported_ones() -> None:
    from vlmserve.shared.models import UnsupportedArchitecture, spec_for, supported_architectures

    with pytest.raises(UnsupportedArchitecture) as err:
        spec_for("MllamaForConditionalGeneration")
    message = str(err.value)
    assert "'MllamaForConditionalGeneration'" in message
    assert all(name in message for name in supported_architectures())


def test_every_family_has_a_compute_side() -> None:
    from vlmserve.shared.models import SPECS
    from vlmserve.workers.models.registry import COMPUTE

    assert sorted(spec.family for spec in SPECS) == sorted(COMPUTE)


def _package_name(folder: str) -> str:
    relative = os.path.relpath(folder, ROOT)
    return "vlmserve" if relative == "." else "vlmserve." + relative.replace(os.sep, ".")


def test_every_package_folder_is_installed() -> None:
    """A non-editable install (a wheel, the Docker image) ships only the packages pyproject
    lists: every folder with an __init__.py must be there, or its imports fail only there."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    on_disk = {
        _package_name(folder)
        for folder, _, names in os.walk(ROOT)
        if "__init__.py" in names
        and not os.path.relpath(folder, ROOT).startswith(("tests", "."))
        or folder == ROOT
    }
    assert on_disk - listed == set(), f"package folders missing from pyproject: {on_disk - listed}"
