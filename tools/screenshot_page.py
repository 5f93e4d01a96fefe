"""Make docs/server-page.png (the README's screenshot): the demo model served, a picture attached,
a question and a follow-up asked in headless Chromium.

    python tools/screenshot_page.py
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from test_server import Server  # noqa: E402
from test_server_page import CHROMIUM, FLAGS  # noqa: E402

from acestep_gguf import convert  # noqa: E402
from acestep_gguf.demo import DEMO_CHECKPOINT  # noqa: E402
from acestep_gguf.shapes import Scene, draw  # noqa: E402


def main() -> None:
    from playwright.sync_api import sync_playwright
    work = Path(tempfile.mkdtemp())
    convert(DEMO_CHECKPOINT, out=work / "demo-gguf", quant="Q8_0", name="acestep-demo")
    picture = work / "shapes.png"
    draw(Scene("triangle", "blue", 3, "light grey"), random.Random(2), size=(320, 240)).save(picture)
    server = Server(work / "demo-gguf")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("document.getElementById('model').textContent === 'acestep-demo'")
            page.set_input_files("#file", str(picture))
            for i, question in enumerate(("Describe this image.", "How many shapes are there?")):
                page.fill("#prompt", question)
                page.press("#prompt", "Enter")
                page.wait_for_function(f"document.querySelectorAll('.assistant .bubble[data-state=done]').length === {i + 1}")
            page.fill("#prompt", "What colour is the shape?")
            page.screenshot(path=str(ROOT / "docs" / "server-page.png"))
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
