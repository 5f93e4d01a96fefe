"""The chat page in a real headless browser (Debian's Chromium, driven by Playwright): attach a picture,
ask, see the right answer stream in, ask a follow-up that is served from the cache, start over."""

from __future__ import annotations

import random
import shutil

import pytest
from test_server import Server

from acestep_gguf import convert
from acestep_gguf.demo import DEMO_CHECKPOINT
from acestep_gguf.shapes import Scene, draw

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "demo-gguf"
    convert(DEMO_CHECKPOINT, out=folder, quant="Q8_0", name="acestep-demo")
    server = Server(folder)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium"):
        pytest.fail("chromium is missing: run tools/install_test_deps.sh (the README's test command does)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def answers(page) -> list[str]:
    page.wait_for_function("document.querySelectorAll('.assistant .bubble[data-state=streaming]').length === 0")
    return page.locator(".assistant .bubble").all_inner_texts()


def test_upload_ask_follow_up_and_start_over(demo_server, browser, tmp_path):
    scene = Scene("circle", "red", 2, "white")
    picture = tmp_path / "two-red-circles.png"
    draw(scene, random.Random(5), size=(200, 160)).save(picture)
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{demo_server.port}/")
    page.wait_for_function("document.getElementById('model').textContent === 'acestep-demo'")
    page.set_input_files("#file", str(picture))
    page.wait_for_selector("#pending img")
    page.fill("#prompt", "How many shapes are there?")
    page.press("#prompt", "Enter")  # the keyboard sends
    page.wait_for_selector(".assistant .bubble[data-state=done]")
    assert answers(page) == [scene.answer("count")]  # "Two."
    page.fill("#prompt", "What colour is the shape?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.assistant .bubble[data-state=done]').length === 2")
    assert answers(page) == [scene.answer("count"), scene.answer("colour")]
    meta = page.locator(".assistant .meta").nth(1)
    assert int(meta.get_attribute("data-cached")) > 16 and "from the cache" in meta.inner_text()
    assert "tokens/s" in meta.inner_text() and len(page.locator(".user img").all()) == 1
    page.keyboard.press("Alt+N")  # new chat
    assert page.locator(".turn").count() == 0
    page.close()
