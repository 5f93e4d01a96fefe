"""The demo task: pictures of identical solid shapes, and plain-English questions with checkable answers.

Pictures come in any size and aspect ratio; shapes are kept inside the centred square that a
CLIP-style centre crop keeps, so the answer stays true after pixel preparation."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 40, 170), "orange": (245, 130, 20)}
BACKGROUNDS = {"white": (255, 255, 255), "light grey": (215, 215, 215)}
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTIONS = {
    "shape": ("What shape is this?", "What shape is in the picture?", "Which shape do you see?",
              "What kind of shape is shown?"),
    "colour": ("What colour is the shape?", "What color is the shape?", "Which colour are the shapes?",
               "What colour do you see?"),
    "count": ("How many shapes are there?", "How many shapes do you see?", "Count the shapes.",
              "How many shapes are in the picture?"),
    "describe": ("Describe this image.", "Describe the picture.", "What is in this picture?",
                 "What do you see?"),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    background: str

    def answer(self, kind: str) -> str:
        if kind == "shape":
            return f"A {self.shape}."
        if kind == "colour":
            return f"{self.colour.capitalize()}."
        if kind == "count":
            return f"{NUMBERS[self.count].capitalize()}."
        noun = self.shape + ("s" if self.count > 1 else "")
        article = NUMBERS[self.count].capitalize() if self.count > 1 else ("An" if self.colour[0] in "aeiou" else "A")
        return f"{article} {self.colour} {noun} on a {self.background} background."


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(1, 3), rng.choice(list(BACKGROUNDS)))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = 4 if shape == "square" else 3
    start = angle + (math.pi / 4 if shape == "square" else -math.pi / 2)
    return [(cx + r * math.cos(start + 2 * math.pi * k / corners), cy + r * math.sin(start + 2 * math.pi * k / corners))
            for k in range(corners)]


def draw(scene: Scene, rng: random.Random, size: tuple[int, int] | None = None, max_short: int = 320) -> Image.Image:
    """The scene as an RGB picture of ``size`` (random size and aspect ratio when None)."""
    if size is None:
        short = rng.randint(56, max_short)
        long = int(short * rng.uniform(1.0, 1.6))
        size = (long, short) if rng.random() < 0.5 else (short, long)
    w, h = size
    scale = 3  # draw large, then downsample: smooth edges at any size
    img = Image.new("RGB", (w * scale, h * scale), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(img)
    side = min(w, h) * scale
    x0, y0 = (w * scale - side) / 2, (h * scale - side) / 2
    radius = side * rng.uniform(0.12, 0.17) if scene.count > 1 else side * rng.uniform(0.17, 0.30)
    centres: list[tuple[float, float]] = []
    for _ in range(scene.count):
        for _attempt in range(200):
            cx = x0 + rng.uniform(radius * 1.1, side - radius * 1.1)
            cy = y0 + rng.uniform(radius * 1.1, side - radius * 1.1)
            if all(math.hypot(cx - a, cy - b) > 2.25 * radius for a, b in centres):
                break
        centres.append((cx, cy))
        colour = COLOURS[scene.colour]
        if scene.shape == "circle":
            pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        else:
            pen.polygon(_polygon(scene.shape, cx, cy, radius * (1.15 if scene.shape == "triangle" else 1.0),
                                 rng.uniform(0, 2 * math.pi)), fill=colour)
    return img.resize((w, h), Image.Resampling.LANCZOS)


def sample(rng: random.Random, kind: str | None = None, max_short: int = 320) -> tuple[Image.Image, str, str, str]:
    """(picture, question, answer, question kind)."""
    scene = random_scene(rng)
    kind = kind or rng.choice(list(QUESTIONS))
    return draw(scene, rng, max_short=max_short), rng.choice(QUESTIONS[kind]), scene.answer(kind), kind
