"""Every quantization type on the demo model, without an importance matrix: bits per weight, size of
the language model, the KL divergence of the first answer token's distribution from F16 (mean and
99th percentile), top-1 agreement with F16, and accuracy — on held-out pictures of the training
generator (the hard range). Figures for docs/quality.md ("The type ladder").

    python bench/type_ladder.py --pictures 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from quality import gguf_answers, held_out, kl  # noqa: E402

from acestep_gguf import convert  # noqa: E402
from acestep_gguf.demo import DEMO_CHECKPOINT  # noqa: E402
from acestep_gguf.quant_types import BY_QUALITY  # noqa: E402
from acestep_gguf.runtime.gguf_header import read_header  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pictures", type=int, default=200)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp()) / "demo"
    types = ("F16",) + BY_QUALITY
    convert(DEMO_CHECKPOINT, out=folder, quant=",".join(types), name="demo")
    pictures = held_out(args.pictures)
    _, reference = gguf_answers(folder, "F16", "F16", pictures)
    print("| type | bits/weight | language model | mean KL from F16 | 99th pct KL | top-1 = F16 | right |")
    print("|---|---|---|---|---|---|---|")
    for quant in types:
        header = read_header(folder / f"demo-{quant}.gguf", "language model")
        n_bytes = sum(t.n_bytes for t in header.tensors)
        n_weights = sum(int(np.prod(t.shape)) for t in header.tensors)
        answers, logprobs = gguf_answers(folder, quant, "F16", pictures)
        kls = np.array([kl(r, q) for r, q in zip(reference, logprobs)])
        top1 = np.mean([r.argmax() == q.argmax() for r, q in zip(reference, logprobs)])
        right = np.mean([a == p[2] for a, p in zip(answers, pictures)])
        print(f"| {quant} | {8 * n_bytes / n_weights:.2f} | {n_bytes / 1e6:.2f} MB | {kls.mean():.2e} | "
              f"{np.percentile(kls, 99):.2e} | {100 * top1:.1f} % | {100 * right:.1f} % |", flush=True)


if __name__ == "__main__":
    main()
