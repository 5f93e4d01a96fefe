"""The demo task: pictures of identical solid shapes, and plain-English questions with checkable answers.

The training distribution is deliberately wide, so that the demo model learns shapes rather than one
drawing program: shapes from 10 % to 90 % of the picture's shorter side, squares and triangles
upright (as people draw them) or at any rotation, triangles of varied proportions, a lone shape often
in the centre, colours a little off their pure values, white,
grey or pale tinted backgrounds, mild blur and JPEG artefacts, any aspect ratio from 1:4 to 4:1, one
to four shapes that may nearly touch — and pictures with no shape at all (noise, gradients, blank),
whose honest answer is "I don't see any shapes.". Shapes stay inside the centred square that a
CLIP-style centre crop keeps, so the answer stays true after pixel preparation."""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 40, 170), "orange": (245, 130, 20)}
BACKGROUNDS = {"white": (255, 255, 255), "light grey": (215, 215, 215), "pale yellow": (250, 244, 214),
               "pale blue": (222, 234, 250), "pale pink": (250, 226, 232)}
NUMBERS = ("zero", "one", "two", "three", "four")
NO_SHAPES = "I don't see any shapes."
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
    count: int  # 0: a picture with no shapes
    background: str

    def answer(self, kind: str) -> str:
        if self.count == 0:
            return NO_SHAPES
        if kind == "shape":
            return f"A {self.shape}."
        if kind == "colour":
            return f"{self.colour.capitalize()}."
        if kind == "count":
            return f"{NUMBERS[self.count].capitalize()}."
        noun = self.shape + ("s" if self.count > 1 else "")
        article = NUMBERS[self.count].capitalize() if self.count > 1 else ("An" if self.colour[0] in "aeiou" else "A")
        return f"{article} {self.colour} {noun} on a {self.background} background."


def random_scene(rng: random.Random, empty: float = 0.0) -> Scene:
    """A scene; with probability ``empty`` one with no shapes."""
    count = 0 if rng.random() < empty else rng.randint(1, 4)
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), count, rng.choice(list(BACKGROUNDS)))


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _on_circle(angle: float) -> tuple[float, float]:
    return math.cos(angle), math.sin(angle)


def _outline(shape: str, rng: random.Random, upright: bool = False) -> list[tuple[float, float]]:
    """Corners of a square or a triangle (varied proportions), upright a third of the time (as people
    draw them; always with ``upright``) and turned at random otherwise, centred on their bounding box,
    whose longer side is 1."""
    turn = 0.0 if upright or rng.random() < 0.35 else rng.uniform(0, 2 * math.pi)
    if shape == "square":
        corners = [_on_circle(turn + math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif turn == 0.0:  # apex up, base level, of any width
        half = rng.uniform(0.55, 1.2)
        corners = [(0.0, -1.0), (half, 1.0), (-half, 1.0)]
    else:  # corners spread at least 80 degrees apart around the circle: never a sliver
        gaps = [rng.uniform(80, 150) for _ in range(2)]
        corners = [_on_circle(a) for a in (turn, turn + math.radians(gaps[0]), turn + math.radians(gaps[0] + gaps[1]))]
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    mx, my, span = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2, max(max(xs) - min(xs), max(ys) - min(ys))
    return [((x - mx) / span, (y - my) / span) for x, y in corners]


def _no_shapes(w: int, h: int, rng: random.Random) -> Image.Image:
    kind = rng.choice(("noise", "gradient", "blank", "blotches"))
    if kind == "noise":
        arr = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (h, w, 3), dtype=np.uint8)
        return Image.fromarray(arr)
    if kind == "gradient":
        a, b = np.array(_jitter((128, 128, 128), rng, 127)), np.array(_jitter((128, 128, 128), rng, 127))
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
        line = (a[None] * (1 - t[:, None]) + b[None] * t[:, None]).astype(np.uint8)
        arr = np.broadcast_to(line[None], (h, w, 3)) if len(t) == w else np.broadcast_to(line[:, None], (h, w, 3))
        return Image.fromarray(np.ascontiguousarray(arr))
    img = Image.new("RGB", (w, h), _jitter((200, 200, 200), rng, 55))
    if kind == "blotches":  # soft texture, nothing with an outline
        small = np.random.default_rng(rng.randrange(1 << 30)).integers(90, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    return img


def draw(scene: Scene, rng: random.Random, size: tuple[int, int] | None = None, max_short: int = 320) -> Image.Image:
    """The scene as an RGB picture of ``size`` (random size and aspect ratio from 1:4 to 4:1 when None)."""
    if size is None:
        short = rng.randint(56, max_short)
        long = int(short * math.exp(rng.uniform(0, math.log(4))))
        size = (long, short) if rng.random() < 0.5 else (short, long)
    w, h = size
    if scene.count == 0:
        return _no_shapes(w, h, rng)
    scale = 3  # draw large, then downsample: smooth edges at any size
    img = Image.new("RGB", (w * scale, h * scale), _jitter(BACKGROUNDS[scene.background], rng, 6))
    pen = ImageDraw.Draw(img)
    side = min(w, h) * scale
    x0, y0 = (w * scale - side) / 2, (h * scale - side) / 2
    # each shape's bounding box, as a share of the visible square: one shape 10-90 %, more shapes
    # smaller so that they fit side by side
    extent = side * rng.uniform(0.10, {1: 0.90, 2: 0.45, 3: 0.36, 4: 0.31}[scene.count])
    colour = _jitter(COLOURS[scene.colour], rng, 22)
    outlines = [None if scene.shape == "circle" else _outline(scene.shape, rng) for _ in range(scene.count)]
    spans = [(1.0, 1.0) if o is None else (max(x for x, _ in o) - min(x for x, _ in o),
                                           max(y for _, y in o) - min(y for _, y in o)) for o in outlines]
    while True:  # place every shape, apart from the others (they may nearly touch); shrink if they do not fit
        centres: list[tuple[float, float, float]] = []
        for bw, bh in spans:
            half_w, half_h, reach = extent * bw / 2, extent * bh / 2, extent * math.hypot(bw, bh) / 2
            if scene.count == 1 and rng.random() < 0.3:
                centres.append((x0 + side / 2, y0 + side / 2, reach))  # where people put a lone shape
                continue
            for _attempt in range(300):
                cx, cy = x0 + rng.uniform(half_w, side - half_w), y0 + rng.uniform(half_h, side - half_h)
                if all(math.hypot(cx - a, cy - b) > 1.02 * (reach + r) for a, b, r in centres):
                    centres.append((cx, cy, reach))
                    break
            else:
                break
        if len(centres) == scene.count:
            break
        extent *= 0.85
    for outline, (cx, cy, _) in zip(outlines, centres):
        if outline is None:
            pen.ellipse([cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2], fill=colour)
        else:
            pen.polygon([(cx + extent * x, cy + extent * y) for x, y in outline], fill=colour)
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.3:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(35, 90))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


# The demo's own pictures: what a person draws to try it (tests/independent_drawer.py's Pillow set is
# the model): one level shape, centred, 40-70 % of the picture's shorter side, in a pure colour on white
# or light grey, an everyday aspect ratio, no blur or compression — asked its shape, colour or count.
# (Measured in docs/quality.md: 99 % right; with two or three shapes, or "Describe this image.", 91-97 %.)
# The full range above is for training, and for `demo --hard`.
TYPICAL_BACKGROUNDS = ("white", "light grey")
TYPICAL_ASPECTS = (1.0, 4 / 3, 3 / 2)
TYPICAL_EXTENT = (0.40, 0.70)
TYPICAL_KINDS = ("shape", "colour", "count")


def typical_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), 1, rng.choice(TYPICAL_BACKGROUNDS))


def draw_typical(scene: Scene, rng: random.Random) -> Image.Image:
    """A clear picture of a one-shape ``scene``: see TYPICAL_* above."""
    short, aspect = rng.randint(192, 320), rng.choice(TYPICAL_ASPECTS)
    w, h = (int(short * aspect), short) if rng.random() < 0.7 else (short, int(short * aspect))
    scale = 3  # draw large, then downsample: smooth edges
    img = Image.new("RGB", (w * scale, h * scale), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(img)
    extent = min(w, h) * scale * rng.uniform(*TYPICAL_EXTENT)
    cx, cy, colour = w * scale / 2, h * scale / 2, COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse([cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2], fill=colour)
    else:
        pen.polygon([(cx + extent * x, cy + extent * y) for x, y in _outline(scene.shape, rng, upright=True)], fill=colour)
    return img.resize((w, h), Image.Resampling.LANCZOS)


def sample(rng: random.Random, kind: str | None = None, max_short: int = 320,
           empty: float = 0.0) -> tuple[Image.Image, str, str, str]:
    """(picture, question, answer, question kind)."""
    scene = random_scene(rng, empty)
    kind = kind or rng.choice(list(QUESTIONS))
    return draw(scene, rng, max_short=max_short), rng.choice(QUESTIONS[kind]), scene.answer(kind), kind
