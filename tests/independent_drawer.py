"""A second picture drawer, written apart from the training generator (acestep_gguf/shapes.py) and
sharing none of its code: shapes are numpy coverage masks (4x4 sub-pixel sampling of an analytic
inside test), placed by their own rules, in other sizes, rotations and proportions. The demo model
never saw a picture from it; its accuracy here is the held-out figure of docs/quality.md.

Only the task's vocabulary is shared (shape, colour and background names, the questions): that is
the contract a user relies on, not the drawing."""

from __future__ import annotations

import io
import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
PALETTE = {"red": (205, 40, 45), "green": (45, 150, 60), "blue": (40, 80, 205), "yellow": (240, 205, 40),
           "purple": (130, 50, 160), "orange": (240, 140, 35)}
BACKDROPS = [(255, 255, 255), (240, 240, 240), (222, 222, 222), (252, 248, 225), (230, 238, 252), (248, 232, 236)]
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
ASK = {"shape": "What shape is this?", "colour": "What colour is the shape?", "count": "How many shapes are there?"}
SUB = 4  # sub-samples per pixel side


def _corners(shape: str, rng: np.random.Generator) -> np.ndarray:
    """A square or triangle's corners, its bounding box centred on 0 with a longer side of 1:
    upright (square level, triangle apex up) or turned, triangles of any apex position."""
    turn = 0.0 if rng.random() < 0.3 else float(rng.uniform(0, 2 * np.pi))
    if shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    else:
        pts = np.array([[-1, 1], [1, 1], [float(rng.uniform(-0.8, 0.8)), -1]], dtype=np.float64)
    c, s = np.cos(turn), np.sin(turn)
    pts = pts @ np.array([[c, s], [-s, c]])
    low, high = pts.min(axis=0), pts.max(axis=0)
    return (pts - (low + high) / 2) / (high - low).max()


def _inside_polygon(corners: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside a convex polygon: on the same side of every edge."""
    sides = []
    for (ax, ay), (bx, by) in zip(corners, np.roll(corners, -1, axis=0)):
        sides.append((bx - ax) * (y - ay) - (by - ay) * (x - ax))
    return np.all(np.stack(sides) >= 0, axis=0) | np.all(np.stack(sides) <= 0, axis=0)


def picture(rng: np.random.Generator, shape: str, colour: str, count: int) -> Image.Image:
    """One picture: ``count`` shapes, none overlapping, all inside the centred square a CLIP-style
    centre crop keeps; each shape's bounding box 10-90 % of that square's side (less when several)."""
    short = int(rng.integers(64, 400))
    ratio = float(np.exp(rng.uniform(0, np.log(4))))
    w, h = (int(short * ratio), short) if rng.random() < 0.5 else (short, int(short * ratio))
    background = np.array(BACKDROPS[int(rng.integers(len(BACKDROPS)))], dtype=np.float32)
    fill = np.clip(np.array(PALETTE[colour], dtype=np.float32) + rng.integers(-15, 16, 3), 0, 255)
    side = min(w, h)
    ox, oy = (w - side) / 2, (h - side) / 2
    extent = side * rng.uniform(0.10, {1: 0.88, 2: 0.42, 3: 0.34, 4: 0.3}[count])
    forms = [None if shape == "circle" else _corners(shape, rng) for _ in range(count)]
    while True:
        placed: list[tuple[float, float, float]] = []
        for form in forms:
            bw, bh = (1.0, 1.0) if form is None else tuple(form.max(axis=0) - form.min(axis=0))
            reach = extent * float(np.hypot(bw, bh)) / 2
            for _ in range(400):
                cx = ox + rng.uniform(extent * bw / 2, side - extent * bw / 2)
                cy = oy + rng.uniform(extent * bh / 2, side - extent * bh / 2)
                if all(np.hypot(cx - a, cy - b) > reach + r + 0.02 * side for a, b, r in placed):
                    placed.append((cx, cy, reach))
                    break
        if len(placed) == count:
            break
        extent *= 0.9
    cover = np.zeros((h * SUB, w * SUB), dtype=bool)
    for form, (cx, cy, reach) in zip(forms, placed):  # sub-pixel samples of the shape's own window
        top, bottom = max(0, int((cy - reach) * SUB)), min(h * SUB, int((cy + reach) * SUB) + 1)
        left, right = max(0, int((cx - reach) * SUB)), min(w * SUB, int((cx + reach) * SUB) + 1)
        ys, xs = np.mgrid[top:bottom, left:right].astype(np.float32)
        xs, ys = (xs + 0.5) / SUB, (ys + 0.5) / SUB
        if form is None:
            cover[top:bottom, left:right] |= (xs - cx) ** 2 + (ys - cy) ** 2 <= (extent / 2) ** 2
        else:
            cover[top:bottom, left:right] |= _inside_polygon(form * extent + [cx, cy], xs, ys)
    alpha = cover.reshape(h, SUB, w, SUB).mean(axis=(1, 3))[..., None]
    pixels = background * (1 - alpha) + fill * alpha
    image = Image.fromarray(np.clip(pixels + rng.normal(0, 2.0, pixels.shape), 0, 255).astype(np.uint8))
    if rng.random() < 0.3:  # a photo's compression
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(50, 90)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def as_people_draw(shape: str, colour, share: float, size: int = 256) -> Image.Image:
    """The picture a person makes with Pillow's primitives: one shape, centred, level, in a pure
    colour (a Pillow colour name such as "yellow" is (255, 255, 0)) on white, its side ``share`` of
    the picture's."""
    from PIL import ImageDraw
    image = Image.new("RGB", (size, size), "white")
    m = size * (1 - share) / 2
    pen = ImageDraw.Draw(image)
    if shape == "triangle":
        pen.polygon([(size / 2, m), (size - m, size - m), (m, size - m)], fill=colour)
    elif shape == "square":
        pen.rectangle([m, m, size - m, size - m], fill=colour)
    else:
        pen.ellipse([m, m, size - m, size - m], fill=colour)
    return image


def expected(kind: str, shape: str, colour: str, count: int) -> str:
    return {"shape": f"A {shape}.", "colour": f"{colour.capitalize()}.", "count": f"{NUMBER_WORDS[count].capitalize()}."}[kind]


def held_out(n: int, seed: int = 20261125) -> list[tuple[Image.Image, str, str, str]]:
    """(picture, question, expected answer, question kind), the kinds in turn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = list(ASK)[i % len(ASK)]
        shape, colour = SHAPES[int(rng.integers(3))], list(PALETTE)[int(rng.integers(len(PALETTE)))]
        count = int(rng.integers(1, 5))
        out.append((picture(rng, shape, colour, count), ASK[kind], expected(kind, shape, colour, count), kind))
    return out


def no_shapes(n: int, seed: int = 7) -> list[Image.Image]:
    """Pictures with no shape in them: noise, and smooth photo-like gradients."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(80, 300)), int(rng.integers(80, 300))
        if i % 2 == 0:
            pixels = rng.integers(0, 256, (h, w, 3))
        else:
            a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            t = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0.3, 1) + np.linspace(0, 1, h)[:, None, None] * 0.3
            pixels = a * (1 - np.clip(t, 0, 1)) + b * np.clip(t, 0, 1)
        out.append(Image.fromarray(pixels.astype(np.uint8)))
    return out
