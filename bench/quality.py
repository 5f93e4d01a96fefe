"""Quality report for docs/quality.md: the shipped demo model on held-out pictures from the training
generator (a seed never used in training) and from an independent drawer (tests/independent_drawer.py),
accuracy per question type for the PyTorch reference and every GGUF type, the mean KL divergence of
each quantized model's first-answer-token distribution from F16, and pictures with no shapes.

    python bench/quality.py --pictures 300
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests"), str(ROOT)]

from train_demo_model import answer as torch_answer  # noqa: E402
from train_demo_model import build_tokenizer  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

from acestep_gguf import VisionChat, convert  # noqa: E402
from acestep_gguf.demo import DEMO_CHECKPOINT  # noqa: E402
from acestep_gguf.shapes import NO_SHAPES, QUESTIONS, sample  # noqa: E402
from independent_drawer import held_out as independent_pictures  # noqa: E402
from independent_drawer import as_people_draw, no_shapes  # noqa: E402

HELD_OUT_SEED = 424242  # training uses 1234 (and 1234 + 1000003 for its own check)
KINDS = list(QUESTIONS)


def held_out(n: int, seed: int = HELD_OUT_SEED) -> list:
    """n pictures, question kinds in rotation so each kind gets n/4."""
    rng = random.Random(seed)
    return [sample(rng, kind=KINDS[i % len(KINDS)]) for i in range(n)]


def gguf_answers(folder: Path, quant: str, mmproj: str, pictures: list) -> tuple[list[str], list[np.ndarray]]:
    answers, logprobs = [], []
    with VisionChat.load(folder, quant=quant, mmproj_quant=mmproj, n_ctx=512) as chat:
        for image, question, _, _ in pictures:
            chat.reset()
            logprobs.append(chat.next_token_logprobs(question, images=[image]))
            chat.reset()
            answers.append(chat.ask(question, images=[image], max_tokens=24).strip())
    return answers, logprobs


def accuracy(answers: list[str], pictures: list) -> dict[str, float]:
    out = {}
    for kind in [k for k in KINDS if any(p[3] == k for p in pictures)]:
        pairs = [(a, p[2]) for a, p in zip(answers, pictures) if p[3] == kind]
        out[kind] = 100.0 * sum(a == e for a, e in pairs) / len(pairs)
    out["all"] = 100.0 * sum(a == p[2] for a, p in zip(answers, pictures)) / len(pictures)
    return out


PIL_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")  # named colours as Pillow draws them


def people_drawn() -> list:
    """(picture, question, expected, kind): each shape, colour and size (20-90 %), asked all three kinds."""
    out = []
    for shape in ("circle", "square", "triangle"):
        for colour in PIL_COLOURS:
            for share in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
                image = as_people_draw(shape, colour, share)
                out += [(image, QUESTIONS["shape"][0], f"A {shape}.", "shape"),
                        (image, QUESTIONS["colour"][0], f"{colour.capitalize()}.", "colour"),
                        (image, QUESTIONS["count"][0], "One.", "count")]
    return out


def kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    return float(np.sum(np.exp(p_log) * (p_log - q_log)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pictures", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(2)
    pictures = held_out(args.pictures)
    folder = Path(tempfile.mkdtemp()) / "demo-gguf"
    convert(DEMO_CHECKPOINT, out=folder, quant="F16,Q8_0,Q5_K_M,Q4_K_M", mmproj_quant="F16", name="demo")
    convert(DEMO_CHECKPOINT, out=folder, quant="F16,Q8_0,Q5_K_M,Q4_K_M", mmproj_quant="Q8_0", name="demo")
    model = LlavaForConditionalGeneration.from_pretrained(DEMO_CHECKPOINT, dtype=torch.float32).eval()
    tok = build_tokenizer()
    started = time.time()
    rows = [("PyTorch (float32 of the BF16 checkpoint)", "-", accuracy(
        [torch_answer(model, tok, image, q) for image, q, _, _ in pictures], pictures), None)]
    reference = None
    for mmproj in ("F16", "Q8_0"):
        for quant in ("F16", "Q8_0", "Q5_K_M", "Q4_K_M"):
            answers, logprobs = gguf_answers(folder, quant, mmproj, pictures)
            if reference is None:
                reference = logprobs
            divergence = float(np.mean([kl(r, q) for r, q in zip(reference, logprobs)]))
            rows.append((f"GGUF {quant}", mmproj, accuracy(answers, pictures), divergence))
    print(f"{args.pictures} held-out pictures (seed {HELD_OUT_SEED}), {time.time() - started:.0f}s\n")
    print("| model | mmproj | shape | colour | count | describe | all | mean KL from F16/F16 (first answer token) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mmproj, acc, divergence in rows:
        kl_text = "-" if divergence is None else f"{divergence:.2e}"
        print(f"| {name} | {mmproj} | " + " | ".join(f"{acc[k]:.1f}" for k in KINDS + ["all"]) + f" | {kl_text} |")

    other = independent_pictures(args.pictures)
    print(f"\n{len(other)} pictures from the independent drawer (tests/independent_drawer.py)\n")
    print("| model | shape | colour | count | all | answers ending in end-of-turn | longest answer (tokens) |")
    print("|---|---|---|---|---|---|---|")
    torch_other = [torch_answer(model, tok, image, q) for image, q, _, _ in other]
    acc = accuracy(torch_other, other)
    print("| PyTorch | " + " | ".join(f"{acc[k]:.1f}" for k in ("shape", "colour", "count", "all")) + " | - | - |")
    for quant in ("F16", "Q8_0", "Q5_K_M", "Q4_K_M"):
        answers, endings = [], []
        with VisionChat.load(folder, quant=quant, mmproj_quant="F16", n_ctx=512) as chat:
            for image, question, _, _ in other:
                chat.reset()
                answers.append(chat.ask(question, images=[image], max_tokens=64).strip())
                endings.append((chat.last_turn.finish_reason, chat.last_turn.completion_tokens))
        acc = accuracy(answers, other)
        stopped = 100.0 * sum(r == "stop" for r, _ in endings) / len(endings)
        print(f"| GGUF {quant} | " + " | ".join(f"{acc[k]:.1f}" for k in ("shape", "colour", "count", "all"))
              + f" | {stopped:.0f} % | {max(n for _, n in endings)} |")
    drawn = people_drawn()
    print(f"\n{len(drawn)} pictures as a person draws them with Pillow (one centred, level shape in a pure "
          "named colour on white, 20-90 % of the side; tests/independent_drawer.py as_people_draw)\n")
    print("| model | shape | colour | count | all |")
    print("|---|---|---|---|---|")
    for quant in ("F16", "Q8_0", "Q5_K_M", "Q4_K_M"):
        with VisionChat.load(folder, quant=quant, mmproj_quant="F16", n_ctx=512) as chat:
            answers = []
            for image, question, _, _ in drawn:
                chat.reset()
                answers.append(chat.ask(question, images=[image], max_tokens=64).strip())
        acc = accuracy(answers, drawn)
        print(f"| GGUF {quant} | " + " | ".join(f"{acc[k]:.1f}" for k in ("shape", "colour", "count", "all")) + " |")
    empty = no_shapes(40)
    with VisionChat.load(folder, quant="Q4_K_M", n_ctx=512) as chat:
        honest = 0
        for image in empty:
            for kind in ("shape", "count", "describe"):
                chat.reset()
                honest += chat.ask(QUESTIONS[kind][0], images=[image], max_tokens=64).strip() == NO_SHAPES
    print(f"\npictures with no shapes (noise, gradients): {honest} of {3 * len(empty)} answers were "
          f"\"{NO_SHAPES}\" (Q4_K_M)")


if __name__ == "__main__":
    main()
