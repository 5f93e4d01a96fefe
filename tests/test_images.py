"""Images are untrusted input: refused with one line before any large allocation, never a traceback;
unusual but valid pictures (16-bit greyscale) keep their content."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from acestep_gguf import ImageError
from acestep_gguf.runtime.images import MAX_PIXELS, PixelRecipe, decode, prepare

RECIPE = PixelRecipe(56, 14, 56)
BIG_RECIPE = PixelRecipe(448, 14, 448)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_a_long_thin_picture_is_refused_before_it_is_scaled_up(tmp_path):
    """14 x 2,000,000 pixels is 28 Mpx (under the cap) but 448 x 64,000,000 once the short side is
    scaled to 448: refused from the header sizes alone, before a pixel is resized."""
    raw = b"".join(b"\0" + b"\x80" * (14 * 3) for _ in range(2_000_000))
    ihdr = struct.pack(">IIBBBBB", 14, 2_000_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b"")
    assert len(data) < 300_000  # a small file that decodes to 84 MB of pixels
    path = tmp_path / "thin.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r"14x2000000 would be resized to 448x64000000, over the .* pixel limit"):
        prepare(path, BIG_RECIPE)


def test_a_huge_compressed_text_chunk_is_one_line(tmp_path):
    image = Image.new("RGB", (60, 60), (10, 20, 30))
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * 20_000_000, zip=True)  # 20 MB that compress to a few KB (zTXt)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageError, match="cannot decode image"):
        prepare(buf.getvalue(), RECIPE)


def test_sixteen_bit_greyscale_keeps_its_tones(tmp_path):
    values = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1))
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)  # stored as 16-bit greyscale
    assert Image.open(path).mode.startswith("I")
    rgb, _ = decode(path)
    row = np.asarray(rgb)[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and 120 <= row[32] <= 135  # a ramp, not clipped to white
    assert np.all(np.diff(row) >= 0)


@pytest.mark.parametrize("make,needle", [
    (lambda p: p, "is a directory"),
    (lambda p: "/dev/zero", "is a character device"),
    (lambda p: (os.mkfifo(p / "pipe.png"), p / "pipe.png")[1], "is a FIFO"),
    (lambda p: p / "absent.png", "no such image file"),
])
def test_things_that_are_not_image_files(tmp_path, make, needle):
    with pytest.raises(ImageError, match=needle):
        prepare(make(tmp_path), RECIPE)


def test_a_picture_over_the_byte_limit_is_refused_unread(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(ImageError, match="over the 64 MiB limit"):
        prepare(path, RECIPE)


def test_pixel_cap_applies_to_pil_images_too():
    side = int(MAX_PIXELS ** 0.5) + 1
    with pytest.raises(ImageError, match="pixel limit"):
        prepare(Image.new("1", (side, side)), RECIPE)
