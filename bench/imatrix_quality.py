"""What an importance matrix buys on the demo model, per low-bit type: the KL divergence of the first
answer token's distribution from F16 (mean, 99th percentile) on held-out image prompts, without an
imatrix, with a text-only one (the training questions and answers as plain text) and with an
image+text one (`acestep-gguf imatrix --conversations`: pictures of the training generator with their
questions and answers). Figures for docs/quality.md.

    python bench/imatrix_quality.py --calibration 200 --pictures 200
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from quality import gguf_answers, held_out, kl  # noqa: E402

from acestep_gguf import convert  # noqa: E402
from acestep_gguf.demo import DEMO_CHECKPOINT  # noqa: E402
from acestep_gguf.imatrix_tool import compute  # noqa: E402
from acestep_gguf.shapes import sample  # noqa: E402

TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ3_XXS", "IQ2_M", "IQ2_XS")
CALIBRATION_SEED = 99  # neither training's seed nor the held-out one


def calibration_set(root: Path, n: int) -> tuple[Path, Path]:
    rng = random.Random(CALIBRATION_SEED)
    lines, text = [], []
    (root / "pictures").mkdir()
    for i in range(n):
        picture, question, answer, _ = sample(rng, empty=0.08)
        picture.save(root / "pictures" / f"{i}.png")
        lines.append(json.dumps({"image": f"pictures/{i}.png", "question": question, "answer": answer}))
        text.append(f"{question} {answer}")
    (root / "talk.jsonl").write_text("\n".join(lines) + "\n")
    (root / "text.txt").write_text("\n".join(text * 4))
    return root / "talk.jsonl", root / "text.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration", type=int, default=200)
    ap.add_argument("--pictures", type=int, default=200)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    convert(DEMO_CHECKPOINT, out=root / "f16", quant="F16", name="demo")
    talk, text = calibration_set(root, args.calibration)
    compute(root / "f16", root / "text.imatrix", text=text, chunk_size=64)
    compute(root / "f16", root / "images.imatrix", conversations=talk, text=text, chunk_size=64)
    pictures = held_out(args.pictures)
    _, reference = gguf_answers(root / "f16", "F16", "F16", pictures)
    print("| type | imatrix | mean KL from F16 | 99th pct KL | right |\n|---|---|---|---|---|")
    for quant in TYPES:
        for label, matrix in (("none", None), ("text", root / "text.imatrix"), ("image+text", root / "images.imatrix")):
            if matrix is None and quant in ("IQ3_XXS", "IQ2_M", "IQ2_XS"):
                continue  # llama.cpp makes these only with one
            out = root / f"{quant}-{label}"
            convert(DEMO_CHECKPOINT, out=out, quant=quant, name="demo", imatrix=matrix)
            answers, logprobs = gguf_answers(out, quant, "F16", pictures)
            kls = np.array([kl(r, q) for r, q in zip(reference, logprobs)])
            right = np.mean([a == p[2] for a, p in zip(answers, pictures)])
            print(f"| {quant} | {label} | {kls.mean():.2e} | {np.percentile(kls, 99):.2e} | {100 * right:.1f} % |",
                  flush=True)


if __name__ == "__main__":
    main()
