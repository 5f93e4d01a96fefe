"""Safe image decoding and pixel preparation.

Decoding refuses anything but JPEG / PNG / WEBP (by content), caps bytes and pixels before
decoding, applies EXIF orientation and flattens transparency on white. Preparation repeats what
the checkpoint's CLIPImageProcessor does (shortest edge → image size with bicubic, centre crop), so
llama.cpp receives an image of exactly its input size and neither pads nor resizes it again."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

FORMATS = ("JPEG", "PNG", "WEBP")
MAX_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192


@dataclass(frozen=True)
class PixelRecipe:
    """How the checkpoint's preprocessing shaped pixels; read from the mmproj GGUF."""

    image_size: int
    patch_size: int
    resize_shortest_edge: int
    resample: int = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class PreparedImage:
    rgb: bytes  # image_size x image_size x 3, row-major
    size: int
    digest: str  # identifies the pixels, so a repeated image is recognised in the KV cache
    label: str  # what to call it in messages


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
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        if path.stat().st_size > MAX_BYTES:
            raise ImageError(f"{path}: {path.stat().st_size} bytes is over the {MAX_BYTES >> 20} MiB image limit")
        return path.read_bytes(), str(path)
    raise ImageError(f"unsupported image value of type {type(image).__name__}: pass a path, bytes, a PIL image or a data: URI")


def decode(image) -> tuple[Image.Image, str]:
    """An RGB PIL image, upright, from any accepted source; refuses formats, bombs and tiny images."""
    data, label = _read_source(image)
    if isinstance(data, Image.Image):
        img = data
        _check_pixels(img, label)
    else:
        if len(data) > MAX_BYTES:
            raise ImageError(f"{label}: {len(data)} bytes is over the {MAX_BYTES >> 20} MiB image limit")
        try:
            with warnings.catch_warnings():  # we apply our own, lower pixel cap just below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_pixels(img, label)  # before decoding a single pixel
            img.load()
        except UnidentifiedImageError:
            raise ImageError(f"{label}: not a JPEG, PNG or WEBP image") from None
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise ImageError(f"{label}: cannot decode image ({e})") from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        flat = Image.new("RGBA", img.size, (255, 255, 255, 255))
        flat.alpha_composite(img)
        img = flat
    return img.convert("RGB"), label


def _check_pixels(img: Image.Image, label: str) -> None:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{label}: {w}x{h} pixels is over the {MAX_PIXELS} pixel limit (decompression bomb?)")


def prepare(image, recipe: PixelRecipe) -> PreparedImage:
    """Decode, resize the shortest edge, centre-crop to the model's square input."""
    img, label = decode(image)
    w, h = img.size
    if min(w, h) < recipe.patch_size:
        raise ImageError(f"{label}: {w}x{h} is smaller than one {recipe.patch_size}-pixel patch")
    edge = recipe.resize_shortest_edge
    new_w, new_h = (edge, max(edge, int(edge * h / w))) if w <= h else (max(edge, int(edge * w / h)), edge)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=recipe.resample)
    size = recipe.image_size
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    rgb = img.tobytes()
    return PreparedImage(rgb, size, hashlib.sha256(rgb).hexdigest()[:16], label)
