"""The README's commands and snippets, run as written, so they cannot go stale.

Its first two commands must be the setup+serve and setup+test commands (the second is what
CI runs). Its Python snippets (openai client, images, APIClient), its curl command and its
terminal-chat command run against a real server on the same demo checkpoint the first
command builds, with the README's address swapped for the test server's and its example
image URL for a local one (this machine has no internet), and then for a data URL.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pexpect
import pytest
from PIL import Image
from server_fixtures import file_server, free_port
from vlm_reference import data_url

from vlmserve.deploy.launcher import server
from vlmserve.shared.config import Config, new_run_id
from vlmserve.workers.demo_vlm import build_vision_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_URL = "http://127.0.0.1:23333"
README_IMAGE = "https://example.com/cat.png"


def readme() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", readme(), flags=re.S)


def test_first_two_commands_serve_the_demo_and_run_the_tests() -> None:
    serve, tests = blocks("bash")[:2]
    assert "deploy/setup.sh" in serve and "demo-checkpoint demo-checkpoint" in serve
    assert "serve api_server ./demo-checkpoint" in serve
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = f.read()
    assert tests.strip() in ci, "CI must run the README's test command"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("readme")
    serve = blocks("bash")[0]
    arch = re.search(r"--arch (\S+)", serve).group(1)
    model_dir = build_vision_checkpoint(str(root / "demo-checkpoint"), arch)
    Image.new("RGB", (64, 48), (200, 120, 30)).save(root / "cat.png")
    config = Config(
        model=model_dir, run_id=new_run_id(), ipc_dir=str(root), server_name="127.0.0.1",
        server_port=free_port(), allowed_media_domains="127.0.0.1", log_level="WARNING",
    )  # fmt: skip
    with file_server(str(root)) as files, server(config, str(root / "server.log")) as srv:
        srv["image_url"] = f"{files}/cat.png"
        srv["image"] = root / "cat.png"
        yield srv


def local(snippet: str, srv: dict, image_url: str) -> str:
    return snippet.replace(README_URL, srv["url"]).replace(README_IMAGE, image_url)


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, f"snippet failed:\n{code}\n{done.stderr[-2000:]}"
    return done.stdout


def test_python_snippets_run(demo: dict) -> None:
    snippets = blocks("python")
    assert len(snippets) >= 3, "openai text, openai image and APIClient snippets"
    first = run_python(local(snippets[0], demo, ""))
    assert first.strip(), "the openai snippet prints the answer"
    image_snippet = next(s for s in snippets if README_IMAGE in s)
    for url in (demo["image_url"], data_url(Image.open(demo["image"]))):
        # The image snippet continues the first one (it uses its client and model).
        code = local(snippets[0], demo, url) + "\n" + local(image_snippet, demo, url)
        code += "\nprint(reply.usage.prompt_tokens)"
        lines = run_python(code).strip().splitlines()
        assert int(lines[-1]) > 20, "the image's placeholder tokens count in the prompt"
    api_snippet = next(s for s in snippets if "APIClient" in s)
    assert run_python(local(api_snippet, demo, "")).strip()


def test_curl_command_runs(demo: dict) -> None:
    [curl] = [b for b in blocks("bash") if b.lstrip().startswith("curl")]
    command = local(curl, demo, "").replace("\\\n", " ")
    out = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "chat.completion.chunk" in out.stdout and "[DONE]" in out.stdout


def test_terminal_chat_command_runs(demo: dict) -> None:
    [cmd] = [b for b in blocks("bash") if "serve api_client" in b]
    command = local(cmd.strip(), demo, "").replace(".venv/bin/vlmserve", os.path.join(
        os.path.dirname(sys.executable), "vlmserve"))  # fmt: skip
    child = pexpect.spawn(command, encoding="utf-8", timeout=60, cwd=REPO)
    try:
        child.expect(">")
        child.sendline("hello")
        child.expect(r"answer (\d+) tokens")
        assert int(child.match.group(1)) > 0
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
