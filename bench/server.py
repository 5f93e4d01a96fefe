"""Server benchmark: a four-turn conversation about one picture through the official `openai` client,
against `acestep-gguf serve` and against llama-cpp-python's own server (`python -m llama_cpp.server`
with its MTMD chat handler) on the same GGUF files; time to first token per turn, then the whole
conversation again after restarting each server. Model: bench/runtime.py's ViT-L-sized one (the image
dominates, as for ACE-Step 1.5). Needs llama-cpp-python's server extras (fastapi, pydantic-settings,
starlette-context).

    python bench/server.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from runtime import build, picture  # noqa: E402
from test_server import free_port  # noqa: E402

QUESTIONS = ("Describe this image in detail.", "What colour is the largest shape?", "How many shapes are there?",
             "Describe it again, briefly.")
MAX_TOKENS = 16


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "2"})
    import http.client
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{cmd[:4]} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def conversation(port: int, model: str, uri: str) -> list[float]:
    """Time to first token of each turn; every request resends the whole conversation."""
    from openai import OpenAI
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)
    messages, ttft = [], []
    for i, question in enumerate(QUESTIONS):
        content = ([{"type": "image_url", "image_url": {"url": uri}}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        started, first, reply = time.perf_counter(), None, ""
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                    temperature=0, stream=True):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece and first is None:
                first = time.perf_counter() - started
            reply += piece or ""
        ttft.append(first if first is not None else time.perf_counter() - started)
        messages.append({"role": "assistant", "content": reply})
    return ttft


def main() -> None:
    work = Path(tempfile.mkdtemp())
    folder = build(work)
    _, uri = picture()
    model, mmproj = folder / "bench-Q8_0.gguf", folder / "mmproj-bench-F16.gguf"
    servers = {
        "acestep-gguf serve": lambda port: [sys.executable, "-m", "acestep_gguf", "serve", "-m", str(folder), "--port",
                                            str(port), "--ctx", "4096", "--threads", "2", "--cache-dir",
                                            str(work / "states")],
        "llama_cpp.server (mtmd)": lambda port: [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                                                 "--clip_model_path", str(mmproj), "--chat_format", "mtmd",
                                                 "--n_ctx", "4096", "--n_threads", "2", "--port", str(port)],
    }
    names = {"acestep-gguf serve": "bench", "llama_cpp.server (mtmd)": str(model)}
    rows = {}
    for label, cmd in servers.items():
        port = free_port()
        proc = start(cmd(port), port)
        try:
            first = conversation(port, names[label], uri)
        finally:
            stop(proc)
        proc = start(cmd(port), port)  # restarted: the same conversation again
        try:
            again = conversation(port, names[label], uri)
        finally:
            stop(proc)
        rows[label] = (first, again)
    print("| server | turn 1 (image) | turn 2 | turn 3 | turn 4 | after restart: turn 1 | turn 4 |")
    print("|---|---|---|---|---|---|---|")
    for label, (first, again) in rows.items():
        print(f"| {label} | " + " | ".join(f"{t:.2f} s" for t in first) + f" | {again[0]:.2f} s | {again[3]:.2f} s |")


if __name__ == "__main__":
    main()
