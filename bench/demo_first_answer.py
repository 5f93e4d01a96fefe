"""What a new user sees first: `acestep-gguf demo --seed N` for N = 0..DRAWS-1 (the demo's own picture
and question for that seed), answered by the converted demo model, right or wrong against the printed
expected answer; the typical pictures by default, `--hard` for the training range. Figures for
docs/quality.md.

    python bench/demo_first_answer.py --draws 300 --quant Q4_K_M,Q8_0 [--hard]
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

from acestep_gguf import VisionChat
from acestep_gguf.demo import demo_question, ensure_demo_model
from acestep_gguf.shapes import QUESTIONS


def accuracy(quant: str, draws: int, hard: bool) -> tuple[int, Counter, Counter, list]:
    folder = ensure_demo_model(quant)
    right, per_kind, asked, wrong = 0, Counter(), Counter(), []
    with VisionChat.load(folder, quant=quant, n_ctx=2048) as chat:
        for seed in range(draws):
            picture, question, expected = demo_question(random.Random(seed), hard=hard)
            chat.reset()
            answer = chat.ask(question, images=[picture], max_tokens=32).strip()  # as run_demo asks
            kind = next(k for k, qs in QUESTIONS.items() if question in qs)
            asked[kind] += 1
            if answer == expected:
                right += 1
                per_kind[kind] += 1
            else:
                wrong.append((seed, question, expected, answer))
    return right, per_kind, asked, wrong


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--quant", default="Q4_K_M,Q8_0")
    parser.add_argument("--hard", action="store_true")
    args = parser.parse_args()
    for quant in args.quant.split(","):
        right, per_kind, asked, wrong = accuracy(quant, args.draws, args.hard)
        kinds = ", ".join(f"{k} {per_kind[k]}/{asked[k]}" for k in QUESTIONS)
        print(f"| {quant} | {'hard' if args.hard else 'typical'} | {right}/{args.draws} = {100 * right / args.draws:.1f} % | {kinds} |")
        for seed, question, expected, answer in wrong:
            print(f"    seed {seed}: {question!r} expected {expected!r} got {answer!r}")


if __name__ == "__main__":
    main()
