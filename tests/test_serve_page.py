"""The web chat page of `scratchlm serve`, in Debian's headless Chromium driven by Playwright (the system
browser through executable_path: Playwright never downloads one here). The screenshot is kept in
tests/artifacts/serve_page.png."""

import shutil
from pathlib import Path

import pytest

from tests.serve_util import ServerProcess

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent / "artifacts"
# The machine has no network: without these Chromium waits on connections it will never get.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if p and Path(p).exists():
            return p
    pytest.skip("chromium not found (Debian package `chromium`; `make test` installs it where it can)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(["--parallel", "2"], tmp_path_factory.mktemp("serve_page"))
    yield s
    s.stop()


@pytest.fixture
def page(tmp_path):
    exe = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=exe, headless=True,
                                                   args=CHROMIUM_FLAGS, viewport={"width": 1000, "height": 700})
        try:
            yield ctx.new_page()
        finally:
            ctx.close()


def test_page_chats_with_streamed_answers(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('SmolLM2')", timeout=60_000)
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#temperature-value") == "0"

    page.fill("#input", "What is the capital of France?")
    page.click("#send")
    page.wait_for_function("document.querySelector('#status').textContent.includes('tokens in')", timeout=300_000)
    answers = page.locator(".msg.assistant .content")
    assert answers.count() == 1 and "Paris" in answers.nth(0).inner_text()

    # a second turn: the conversation so far goes with it, and the answer streams into a new bubble
    page.fill("#input", "And what is the capital of Germany?")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                           "document.querySelector('#status').textContent.includes('tokens in')", timeout=300_000)
    assert "Berlin" in answers.nth(1).inner_text()
    assert page.locator(".msg.user").count() == 2

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
    text = page.inner_text("body")
    assert "SmolLM2-135M-Instruct" in text and "What is the capital of France?" in text and "Paris" in text


def test_page_stop_button(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('SmolLM2')", timeout=60_000)
    page.fill("#max-tokens", "2000")
    page.fill("#input", "Write a very long essay about the history of Europe.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .content').textContent.length > 0",
                           timeout=300_000)
    page.click("#stop")
    page.wait_for_function("document.querySelector('#status').textContent == 'stopped'", timeout=60_000)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
