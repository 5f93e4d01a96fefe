"""Ray captioning throughput: the same pictures captioned by the single-process `caption` (2 threads)
and by `caption --ray` with 1 and 2 workers of 1 CPU each, on a local Ray cluster on this machine.
Model: bench/runtime.py's (a ViT-L/14-sized tower at 336 px, so that each image costs ~1 s).

    python bench/ray_caption.py --images 16
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from runtime import build  # noqa: E402

from acestep_gguf import VisionChat  # noqa: E402
from acestep_gguf.runtime.caption import caption_images  # noqa: E402
from acestep_gguf.runtime.ray_caption import caption_with_ray  # noqa: E402
from acestep_gguf.shapes import draw, random_scene  # noqa: E402

PROMPT, MAX_TOKENS = "Describe this image.", 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    folder = build(work)
    rng = random.Random(3)
    pics = work / "pics"
    pics.mkdir()
    for i in range(args.images):
        draw(random_scene(rng), rng, size=(400, 336)).save(pics / f"p{i:03d}.png")
    files = sorted(pics.iterdir())
    rows = []
    began = time.perf_counter()
    with VisionChat.load(folder, n_ctx=2048, n_threads=2) as chat:
        loaded = time.perf_counter()
        caption_images(chat, files, PROMPT, work / "single.jsonl", max_tokens=MAX_TOKENS)
    single = time.perf_counter() - loaded
    rows.append(("single process, 2 threads", single, time.perf_counter() - began))
    for workers in (1, 2):
        began = time.perf_counter()
        summary = caption_with_ray(folder, files, PROMPT, work / f"ray{workers}.jsonl", workers=workers,
                                   cpus_per_worker=1, n_ctx=2048, max_tokens=MAX_TOKENS)
        rows.append((f"Ray, {workers} worker(s) x 1 CPU", summary["seconds"], time.perf_counter() - began))
    print(f"{args.images} pictures, {MAX_TOKENS} tokens each\n")
    print("| run | captioning | images/s | with start-up | vs. single process |\n|---|---|---|---|---|")
    for name, seconds, total in rows:
        print(f"| {name} | {seconds:.1f} s | {args.images / seconds:.2f} | {total:.1f} s | {single / seconds:.2f}x |")
    one, two = rows[1][1], rows[2][1]
    print(f"\nscaling from 1 to 2 workers: {one / two:.2f}x ({one / two / 2 * 100:.0f} % efficiency)")


if __name__ == "__main__":
    main()
