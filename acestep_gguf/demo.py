"""The bundled demo model: converted once into the user cache with the real converter, then asked
about a freshly drawn picture. It is what a new user's first command runs."""

from __future__ import annotations

import os
import random
from pathlib import Path

from .convert import convert
from .errors import ModelFilesError
from .manifest import Manifest
from .runtime import VisionChat
from .shapes import QUESTIONS, TYPICAL_KINDS, draw, draw_typical, random_scene, typical_scene

DEMO_CHECKPOINT = Path(__file__).parent / "demo_model"
DEMO_NAME = "acestep-demo"


def cache_folder() -> Path:
    """$ACESTEP_GGUF_CACHE, else $XDG_CACHE_HOME/acestep-gguf, else ~/.cache/acestep-gguf."""
    if os.environ.get("ACESTEP_GGUF_CACHE"):
        return Path(os.environ["ACESTEP_GGUF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "acestep-gguf"


def demo_gguf_folder() -> Path:
    return cache_folder() / f"{DEMO_NAME}-gguf"


def ensure_demo_model(quant: str | None = "Q8_0") -> Path:
    """The converted demo folder with ``quant`` in it (any type when None, Q8_0 the first time);
    converts (seconds) only what is missing."""
    if not (DEMO_CHECKPOINT / "model.safetensors").exists():
        raise ModelFilesError(f"{DEMO_CHECKPOINT}: the demo checkpoint is not installed with this package")
    folder = demo_gguf_folder()
    if quant is None:
        try:
            if any(f.role == "language" and (folder / f.file).is_file() for f in Manifest.read(folder).files):
                return folder
        except ModelFilesError:
            pass
        quant = "Q8_0"
    convert(DEMO_CHECKPOINT, out=folder, quant=[quant], mmproj_quant="F16", name=DEMO_NAME)  # reuses what matches
    return folder


def demo_question(rng: random.Random, prompt: str | None = None, hard: bool = False):
    """(picture, question, expected answer or None): a clear picture such as a person draws to try the
    model, asked its shape, colour or count; with ``hard``, one from the training generator's full range
    (tiny or tinted shapes, 1:4 pictures, blur) and any question, description included."""
    scene = random_scene(rng) if hard else typical_scene(rng)
    kind = rng.choice(list(QUESTIONS) if hard else TYPICAL_KINDS)
    question = prompt or rng.choice(QUESTIONS[kind])
    kinds = [k for k, qs in QUESTIONS.items() if question in qs]
    picture = draw(scene, rng) if hard else draw_typical(scene, rng)
    return picture, question, scene.answer(kinds[0]) if kinds else None


def run_demo(folder: Path, image: str | None = None, prompt: str | None = None, seed: int | None = None,
             quant: str = "Q8_0", verbose: bool = False, hard: bool = False) -> dict:
    """Draw a picture (unless ``image`` is given), ask, and return what a person wants to see."""
    rng = random.Random(seed)
    expected = None
    if image is None:
        picture, question, expected = demo_question(rng, prompt, hard)
        pictures = cache_folder() / "demo-pictures"
        pictures.mkdir(parents=True, exist_ok=True)
        image = str(pictures / f"shapes-{rng.randrange(10**8):08d}.png")
        picture.save(image)
    else:
        question = prompt or "Describe this image."
    with VisionChat.load(folder, quant=quant, n_ctx=2048, verbose=verbose) as chat:
        answer = chat.ask(question, images=[image], max_tokens=32).strip()
    return {"image": image, "question": question, "answer": answer, "expected": expected}
