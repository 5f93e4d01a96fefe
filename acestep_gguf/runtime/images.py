"""Safe image decoding and pixel preparation.

Decoding refuses anything but JPEG / PNG / WEBP (by content), caps bytes and pixels before
decoding, applies EXIF orientation and flattens transparency on white. Preparation repeats what
the checkpoint's processor does — CLIPImageProcessor (shortest edge → image size with bicubic, centre
crop), for a tower with grid pinpoints LlavaNextImageProcessor (an overview and the tiles of the
best pinpoint, models/llava_next.py), for Pixtral PixtralImageProcessor (the picture's own aspect,
sides multiples of the patch, models/pixtral.py) — so llama.cpp receives pictures of exactly the
size it encodes and neither pads nor resizes them again."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from ..files import read_bytes
from ..models import llava_next

FORMATS = ("JPEG", "PNG", "WEBP")
MAX_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192
MAX_DECODED_BYTES = 512 << 20  # pixels as Pillow holds them, before any conversion (servers pass less)
# Bytes per pixel as Pillow stores each mode (RGB is kept in 4 bytes); anything else counts 4.
PILLOW_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
ROWS_AT_ONCE = 512  # 16/32-bit pictures are scaled to 8 bits this many rows at a time


@dataclass(frozen=True)
class PixelRecipe:
    """How the checkpoint's preprocessing shaped pixels; read from the mmproj GGUF."""

    image_size: int
    patch_size: int
    resize_shortest_edge: int
    resample: int = Image.Resampling.BICUBIC
    pinpoints: tuple = ()  # (height, width) pairs: the picture is tiled (LLaVA-NeXT); empty: one square crop
    longest_edge: int = 0  # > 0: the picture keeps its aspect, its longest edge at most this (Pixtral)
    image_tokens: int = 0  # the most positions one picture takes (its tower's count); 0: one square crop's

    @property
    def square(self) -> bool:
        """One square crop per picture (CLIP): the same positions for every picture."""
        return not (self.pinpoints or self.longest_edge)

    def max_image_tokens(self) -> int:
        """The most positions one picture can take in the language model's context."""
        return self.image_tokens or (self.image_size // self.patch_size) ** 2

    def layout(self, height: int, width: int) -> "llava_next.AnyresLayout":
        return llava_next.layout(height, width, self.pinpoints, self.image_size, self.patch_size)


@dataclass(frozen=True)
class PreparedImage:
    rgb: bytes  # image_size x image_size x 3, row-major: the square crop, or a tiled picture's overview
    size: int
    digest: str  # identifies the pixels, so a repeated image is recognised in the KV cache
    label: str  # what to call it in messages
    tiles: tuple = ()  # a tiled picture's tiles after the overview, row by row (same format as rgb)
    layout: "llava_next.AnyresLayout | None" = None  # how a tiled picture's features are packed
    shape: tuple = ()  # (width, height) of a picture kept at its own aspect (rgb is that size); () = square

    @property
    def width_height(self) -> tuple[int, int]:
        """The size of ``rgb``."""
        return self.shape or (self.size, self.size)

    @property
    def n_tokens(self) -> int | None:
        """Positions in the language model, where the runtime packs them itself (tiled pictures)."""
        return self.layout.n_tokens if self.layout is not None else None


def _read_source(image) -> tuple[bytes | Image.Image, str]:
    if isinstance(image, Image.Image):
        return image, "PIL image"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "image bytes"
    if isinstance(image, (str, os.PathLike)):
        text = str(image)
        low = text.lower()
        if low.startswith(("http://", "https://", "file://", "ftp://")):
            raise ImageError(f"{text[:80]}: URLs are not fetched (the runtime is offline); pass a local path, "
                             "bytes or a data: URI")
        if low.startswith("data:"):
            header, _, payload = text.partition(",")
            if ";base64" not in header:
                raise ImageError("data: URI: only base64 data URIs are supported")
            try:
                return base64.b64decode(payload, validate=True), "data: URI"
            except (binascii.Error, ValueError):
                raise ImageError("data: URI: the base64 payload is invalid") from None
        path = Path(text).expanduser()
        return read_bytes(path, ImageError, MAX_BYTES, "image file"), str(path)
    raise ImageError(f"unsupported image value of type {type(image).__name__}: pass a path, bytes, a PIL image or a data: URI")


def decode(image, max_decoded_bytes: int = MAX_DECODED_BYTES) -> tuple[Image.Image, str]:
    """An RGB PIL image, upright, from any accepted source; refuses formats, bombs and tiny images.
    The decoded size (width x height x bytes per pixel of its mode) is checked from the header,
    before a single pixel is decoded."""
    data, label = _read_source(image)
    if isinstance(data, Image.Image):
        img = data
        _check_pixels(img, label, max_decoded_bytes)
    else:
        if len(data) > MAX_BYTES:
            raise ImageError(f"{label}: {len(data)} bytes is over the {MAX_BYTES >> 20} MiB image limit")
        try:
            with warnings.catch_warnings():  # we apply our own, lower pixel cap just below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_pixels(img, label, max_decoded_bytes)  # before decoding a single pixel
            img.load()
        except UnidentifiedImageError:
            raise ImageError(f"{label}: not a JPEG, PNG or WEBP image") from None
        except ImageError:
            raise
        except Exception as e:  # Pillow raises OSError, ValueError (huge text chunks), SyntaxError, ...
            raise ImageError(f"{label}: cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        pass
    img = _eight_bit(img)
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        flat = Image.new("RGBA", img.size, (255, 255, 255, 255))
        flat.alpha_composite(img)
        img = flat
    return img.convert("RGB"), label


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale scaled to 8 bits (Pillow's convert would clip them to white), a
    band of rows at a time: the extra memory is the 8-bit result, not a float copy of the picture."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return img
    values = np.asarray(img)
    out = np.empty(values.shape, np.uint8)
    if img.mode == "F":
        low, top = 0.0, 1.0
    else:
        low, top = 0.0, 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    for start in range(0, values.shape[0], ROWS_AT_ONCE):
        rows = np.nan_to_num(values[start:start + ROWS_AT_ONCE].astype(np.float32))
        out[start:start + ROWS_AT_ONCE] = (np.clip((rows - low) / (top - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(out, "L")


def decoded_bytes(img: Image.Image) -> int:
    w, h = img.size
    return w * h * PILLOW_BYTES.get(img.mode, 4)


def _check_pixels(img: Image.Image, label: str, max_decoded_bytes: int = MAX_DECODED_BYTES) -> None:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{label}: {w}x{h} pixels is over the {MAX_PIXELS} pixel limit (decompression bomb?)")
    if decoded_bytes(img) > max_decoded_bytes:
        raise ImageError(f"{label}: {w}x{h} {img.mode} decodes to {decoded_bytes(img) >> 20} MiB, over the "
                         f"{max_decoded_bytes >> 20} MiB limit for one picture")


def prepare(image, recipe: PixelRecipe, max_decoded_bytes: int = MAX_DECODED_BYTES) -> PreparedImage:
    """Decode and shape as the checkpoint's processor does: shortest edge + centre crop to the square
    input, tiles (LLaVA-NeXT) or the picture's own aspect (Pixtral); an image prepared earlier for the
    same recipe passes through."""
    if (isinstance(image, PreparedImage) and image.size == recipe.image_size and bool(image.layout) == bool(recipe.pinpoints)
            and bool(image.shape) == bool(recipe.longest_edge)):
        return image
    img, label = decode(image, max_decoded_bytes)
    if recipe.pinpoints:  # tiles and native sizes scale any picture, as their processors do
        return _tiled(img, label, recipe)
    if recipe.longest_edge:
        return _native(img, label, recipe)
    w, h = img.size
    if min(w, h) < recipe.patch_size:
        raise ImageError(f"{label}: {w}x{h} is smaller than one {recipe.patch_size}-pixel patch")
    edge = recipe.resize_shortest_edge
    new_w, new_h = (edge, max(edge, int(edge * h / w))) if w <= h else (max(edge, int(edge * w / h)), edge)
    if new_w * new_h > MAX_PIXELS:  # a long thin picture scaled up: refused before any pixel is made
        raise ImageError(f"{label}: {w}x{h} would be resized to {new_w}x{new_h}, over the {MAX_PIXELS} pixel limit "
                         f"(aspect ratio {max(w, h) / min(w, h):.0f}:1)")
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=recipe.resample)
    size = recipe.image_size
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    rgb = img.tobytes()
    return PreparedImage(rgb, size, hashlib.sha256(rgb).hexdigest()[:16], label)


def _tiled(img: Image.Image, label: str, recipe: PixelRecipe) -> PreparedImage:
    """LlavaNextImageProcessor's tiles: the overview (the picture squashed to one tile), then the
    picture fitted into the best pinpoint, centred on black, cut row by row."""
    w, h = img.size
    size, where = recipe.image_size, recipe.layout(h, w)
    fit_h, fit_w = llava_next.fitted_size(h, w, where.rows * size, where.cols * size)
    canvas = Image.new("RGB", (where.cols * size, where.rows * size), (0, 0, 0))
    canvas.paste(img.resize((fit_w, fit_h), resample=recipe.resample),
                 ((where.cols * size - fit_w) // 2, (where.rows * size - fit_h) // 2))
    overview = img.resize((size, size), resample=recipe.resample).tobytes()
    tiles = tuple(canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)).tobytes()
                  for r in range(where.rows) for c in range(where.cols))
    digest = hashlib.sha256(overview + b"".join(tiles) + repr(where).encode()).hexdigest()[:16]
    return PreparedImage(overview, size, digest, label, tiles, where)


def native_size(width: int, height: int, longest_edge: int, patch: int) -> tuple[int, int]:
    """PixtralImageProcessor's size: scaled down to fit the longest edge (floor), then each side up to
    a whole number of patches."""
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return ((width - 1) // patch + 1) * patch, ((height - 1) // patch + 1) * patch


def _native(img: Image.Image, label: str, recipe: PixelRecipe) -> PreparedImage:
    size = native_size(*img.size, recipe.longest_edge, recipe.patch_size)
    if size != img.size:
        img = img.resize(size, resample=recipe.resample)
    rgb = img.tobytes()
    digest = hashlib.sha256(rgb + repr(size).encode()).hexdigest()[:16]
    return PreparedImage(rgb, recipe.image_size, digest, label, shape=size)
