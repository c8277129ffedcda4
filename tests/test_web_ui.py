"""The web chat page (/ui) in a real browser, against the real server.

Playwright drives Debian's chromium (system package; Playwright's own browser download is
not used):

    apt-get install -y chromium

The main server has API keys on and serves the tiny Llama checkpoint, which answers text
only, so an attached image must come back as a clear error on the page; a second server on
a vision-language demo checkpoint answers an image message, streamed, with the same text the
API gives for it. The screenshot the README shows, docs/ui.png, is taken here.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from server_fixtures import local_config, metrics, wait_for

from vlmserve.client import APIClient
from vlmserve.deploy.launcher import server
from vlmserve.workers.demo_vlm import build_vision_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
API_KEY = "sk-web-ui"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "ui.png"
STREAM_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def srv(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("webui")
    config = local_config(
        checkpoints["llama"],
        workdir,
        frontend_workers=1,
        api_keys=API_KEY,
        session_len=2048,
        num_kv_blocks=1024,
    )
    with server(config, str(workdir / "server.log")) as running:
        yield running


@pytest.fixture(scope="module")
def api(srv: dict):
    with APIClient(srv["url"], api_key=API_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def context(browser):  # noqa: ANN001, ANN201 - one browser profile: localStorage carries over
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    yield context
    context.close()


@pytest.fixture
def page(context, srv: dict):  # noqa: ANN001, ANN201
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(srv["url"] + "/ui")
    yield page
    page.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def greedy(api: APIClient, model: str, messages: list[dict], max_tokens: int) -> str:
    [reply] = api.chat_completions_v1(model, messages, max_tokens=max_tokens, temperature=0)
    return reply["choices"][0]["message"]["content"]


def settings(page, temperature: str, max_tokens: str) -> None:  # noqa: ANN001
    page.get_by_label("Temperature").fill(temperature)
    page.get_by_label("Max tokens").fill(max_tokens)


def send(page, text: str):  # noqa: ANN001, ANN201
    """Type `text`, press Send; the assistant message that answers it."""
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()
    return page.locator(".message.assistant").last


def test_page_and_assets_are_local(srv: dict) -> None:
    page = httpx.get(srv["url"] + "/ui")  # no API key needed for the page itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/ui/app.js", "/static/ui/style.css"):
        assert asset in page.text
        body = httpx.get(srv["url"] + asset).text
        assert "http://" not in body and "https://" not in body, f"{asset} loads nothing remote"


def test_api_key_then_a_streamed_answer_equal_to_the_api(page, srv: dict, api: APIClient) -> None:  # noqa: ANN001
    model = srv["config"].served_name
    # No key yet: the model list is refused, and the page says what to do.
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("HTTP 401")
    expect(alert).to_contain_text("API key")
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("API key").press("Tab")  # `change`: stored, models listed again
    expect(page.get_by_label("Model")).to_have_value(model)
    expect(alert).to_be_hidden()

    settings(page, "0", "40")
    # Count the updates of the answer as it is written: a streamed answer has several.
    page.evaluate(
        """() => {
            window.answerUpdates = 0;
            new MutationObserver(() => window.answerUpdates++).observe(
                document.getElementById("conversation"),
                {subtree: true, childList: true, characterData: true});
        }"""
    )
    u1 = "hello there, how are you?"
    answer = send(page, u1)
    expect(answer).to_have_attribute("data-state", "done", timeout=STREAM_TIMEOUT_MS)
    a1 = greedy(api, model, [{"role": "user", "content": u1}], 40)
    assert answer.locator(".content").text_content() == a1
    assert page.evaluate("window.answerUpdates") > 4, "the answer should arrive in pieces"

    # The second turn (sent with Enter) is asked with the first one in the conversation.
    u2 = "and tomorrow?"
    page.get_by_label("Message").fill(u2)
    page.get_by_label("Message").press("Enter")
    answer = page.locator(".message.assistant").nth(1)
    expect(answer).to_have_attribute("data-state", "done", timeout=STREAM_TIMEOUT_MS)
    history = [
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": u2},
    ]
    assert answer.locator(".content").text_content() == greedy(api, model, history, 40)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))

    # The key was kept in this browser.
    page.reload()
    expect(page.get_by_label("API key")).to_have_value(API_KEY)
    expect(page.get_by_label("Model")).to_have_value(model)


def test_an_image_for_a_text_model_shows_the_servers_error(
    page,
    srv: dict,
    api: APIClient,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    model = srv["config"].served_name
    image = tmp_path / "red.png"
    Image.new("RGB", (48, 32), (200, 30, 30)).save(image)
    expect(page.get_by_label("Model")).to_have_value(model)  # the stored key was used
    settings(page, "0", "8")
    # A pasted image is attached too, and can be removed again.
    page.get_by_label("Message").evaluate(
        """(box) => {
            const data = new DataTransfer();
            data.items.add(new File([new Uint8Array([137, 80, 78, 71])], "clip.png",
                                    {type: "image/png"}));
            box.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data}));
        }"""
    )
    expect(page.locator("#attachment-name")).to_have_text("clip.png")
    page.get_by_role("button", name="Remove image").click()
    expect(page.get_by_role("button", name="Remove image")).to_be_hidden()
    page.get_by_label("Attach image").set_input_files(str(image))
    expect(page.get_by_role("button", name="Remove image")).to_be_visible()
    send(page, "what is in this picture?")
    alert = page.get_by_role("alert")
    expect(alert).to_have_text("HTTP 400: this model does not accept images")
    expect(page.locator(".message.user.failed img")).to_be_visible()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(page.get_by_role("button", name="Remove image")).to_be_hidden()

    # The refused turn is not part of the conversation: the next answer is the one-turn one.
    text = "red blue"
    answer = send(page, text)
    expect(answer).to_have_attribute("data-state", "done", timeout=STREAM_TIMEOUT_MS)
    expect(alert).to_be_hidden()
    expected = greedy(api, model, [{"role": "user", "content": text}], 8)
    assert answer.locator(".content").text_content() == expected


def test_stop_ends_the_stream_and_the_server_aborts(page, srv: dict) -> None:  # noqa: ANN001
    url = srv["url"]
    expect(page.get_by_label("Model")).to_have_value(srv["config"].served_name)
    settings(page, "0", "1500")
    answer = send(page, "Tell me a long story")
    expect(answer.locator(".content")).not_to_be_empty(timeout=STREAM_TIMEOUT_MS)
    wait_for(lambda: metrics(url)["vlmserve:num_requests_running"] >= 1, 10, "it to run")
    assert answer.get_attribute("data-state") == "streaming", "the answer ended by itself"
    page.get_by_role("button", name="Stop").click()
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    wait_for(
        lambda: metrics(url)["vlmserve:num_requests_running"] == 0,
        10,
        "the server to abort the stopped request",
    )
    text = answer.locator(".content").text_content()
    page.wait_for_timeout(1000)
    assert answer.locator(".content").text_content() == text, "text arrived after Stop"
    expect(page.get_by_role("alert")).to_be_hidden()


@pytest.fixture(scope="module")
def vlm_srv(tmp_path_factory: pytest.TempPathFactory):
    """A second server, on a vision-language demo checkpoint (Qwen2-VL-shaped, no API key)."""
    workdir = tmp_path_factory.mktemp("webui-vlm")
    model_dir = build_vision_checkpoint(str(workdir / "vlm"), "qwen2_vl")
    config = local_config(model_dir, workdir)
    with server(config, str(workdir / "server.log")) as running:
        yield running


def test_an_image_message_gets_the_models_streamed_answer(
    context,  # noqa: ANN001
    vlm_srv: dict,
    tmp_path: Path,
) -> None:
    image = tmp_path / "photo.png"
    Image.new("RGB", (60, 40), (30, 90, 200)).save(image)
    page = context.new_page()
    page.goto(vlm_srv["url"] + "/ui")
    model = vlm_srv["config"].served_name
    expect(page.get_by_label("Model")).to_have_value(model)
    settings(page, "0", "12")
    page.get_by_label("Attach image").set_input_files(str(image))
    answer = send(page, "what is in this picture?")
    expect(answer).to_have_attribute("data-state", "done", timeout=STREAM_TIMEOUT_MS)
    expect(page.locator(".message.user img")).to_be_visible()
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    message = {"role": "user", "content": [  # as the page sends it: text, then the image
        {"type": "text", "text": "what is in this picture?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]}  # fmt: skip
    with APIClient(vlm_srv["url"]) as api:
        assert answer.locator(".content").text_content() == greedy(api, model, [message], 12)
    page.close()
