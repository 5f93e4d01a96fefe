"""What thread count `serve` should default to on a desktop that is busy with other work: the demo
model (Q4_K_M) served with --threads 1 .. all cores, 40 short requests one after another (a picture and
a question, 8 tokens), with and without CPU contention (one busy process per core, as a compile or a
browser tab would be); latency p50 / p90 / max per setting. Figures for docs/performance.md.

    python bench/server_threads.py
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from test_server import Server, data_uri  # noqa: E402

from acestep_gguf.demo import ensure_demo_model  # noqa: E402
from acestep_gguf.shapes import draw, typical_scene  # noqa: E402

REQUESTS = 40


def latencies(server: Server, picture: Path) -> list[float]:
    client, out = server.client(), []
    for i in range(REQUESTS):
        started = time.perf_counter()
        client.chat.completions.create(model="acestep-demo", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(picture)}},
            {"type": "text", "text": f"What shape is this? ({i})"}]}])  # a new question each time: no full cache hit
        out.append(time.perf_counter() - started)
    return sorted(out)


def main() -> None:
    folder = ensure_demo_model("Q4_K_M")
    picture = Path("/tmp/acestep-threads-bench.png")
    rng = random.Random(1)
    draw(typical_scene(rng), rng, size=(256, 256)).save(picture)
    cores = len(os.sched_getaffinity(0))
    print(f"| --threads | contention | p50 s | p90 s | max s |\n|---|---|---|---|---|")
    for contended in (False, True):
        for threads in range(1, cores + 1):
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)] if contended else []
            try:
                server = Server(folder, "--threads", str(threads), quant="Q4_K_M")
                try:
                    t = latencies(server, picture)
                finally:
                    server.stop()
            finally:
                for h in hogs:
                    h.kill()
            print(f"| {threads} | {'one busy process per core' if contended else 'none'} | {t[len(t) // 2]:.3f} | "
                  f"{t[int(len(t) * 0.9)]:.3f} | {t[-1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
