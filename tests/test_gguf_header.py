"""The runtime's GGUF header reader cannot be pushed around: hostile headers and seeded random
mutations of real files give a ModelFilesError (never another exception, a hang or a crash), and on
every valid file it agrees with gguf-py's GGUFReader."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import pytest
from gguf import GGUFReader

from acestep_gguf import ModelFilesError
from acestep_gguf.runtime.gguf_header import LongArray, read_header

U32, STRING, ARRAY, U64 = 4, 8, 9, 10


def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def header(n_tensors: int, n_kv: int, body: bytes, pad: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body + b"\0" * pad


def kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def nested_arrays(depth: int) -> bytes:
    payload = struct.pack("<IQ", U32, 1) + struct.pack("<I", 7)
    for _ in range(depth):
        payload = struct.pack("<IQ", ARRAY, 1) + payload
    return payload


HOSTILE = {
    "2^62 metadata entries": (header(0, 1 << 62, b""), "metadata entries cannot fit"),
    "2^62 tensors": (header(1 << 62, 0, b""), "tensors cannot fit"),
    "string claims 2^62 bytes": (header(0, 1, kv(b"k", STRING, struct.pack("<Q", 1 << 62)), pad=4096), "claims"),
    "string past the end": (header(0, 1, kv(b"k", STRING, struct.pack("<Q", 5000) + b"x" * 10)), "past the end"),
    "int array of 2^62": (header(0, 1, kv(b"k", ARRAY, struct.pack("<IQ", U32, 1 << 62))), "claims"),
    "string array longer than the file": (header(0, 1, kv(b"k", ARRAY, struct.pack("<IQ", STRING, 1 << 20))),
                                          "more than the file can hold"),
    "arrays nested 5000 deep": (header(0, 1, kv(b"k", ARRAY, nested_arrays(5000))), "array of arrays"),
    "unknown value type": (header(0, 1, kv(b"k", 99, b"\0" * 8)), "unknown value type 99"),
    "duplicate key": (header(0, 2, kv(b"k", U32, b"\1\0\0\0") * 2), "appears twice"),
    "key not UTF-8": (header(0, 1, kv(b"\xff\xfe", U32, b"\1\0\0\0")), "not UTF-8"),
    "version 1": (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1"),
    "bad magic": (b"GGML" + b"\0" * 40, "bad magic"),
    "alignment not a power of two": (header(0, 1, kv(b"general.alignment", U32, struct.pack("<I", 48))),
                                     "not a power of two"),
    "five dimensions": (header(1, 0, gguf_string(b"t") + struct.pack("<I", 5) + struct.pack("<5Q", 1, 1, 1, 1, 1)
                               + struct.pack("<IQ", 0, 0), pad=64), "5 dimensions"),
    "zero dimension": (header(1, 0, gguf_string(b"t") + struct.pack("<IQ", 1, 0) + struct.pack("<IQ", 0, 0), pad=64),
                       "dimension 0"),
    "unknown tensor type": (header(1, 0, gguf_string(b"t") + struct.pack("<IQ", 1, 4) + struct.pack("<IQ", 77, 0),
                                   pad=64), "unknown type 77"),
    "tensor data past the end": (header(1, 0, gguf_string(b"t") + struct.pack("<IQ", 1, 1 << 30)
                                        + struct.pack("<IQ", 0, 0), pad=64), "outside the file"),
    "misaligned data offset": (header(1, 0, gguf_string(b"t") + struct.pack("<IQ", 1, 4) + struct.pack("<IQ", 0, 3),
                                      pad=64), "misaligned"),
    "row not a whole block": (header(1, 0, gguf_string(b"t") + struct.pack("<IQ", 1, 33) + struct.pack("<IQ", 8, 0),
                                     pad=256), "does not fit type Q8_0"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_headers_are_one_line_errors(tmp_path, case):
    data, needle = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelFilesError, match=needle) as caught:
        read_header(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_non_regular_files_are_refused(tmp_path):
    import os
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)  # opening it for reading would block forever without a writer
    with pytest.raises(ModelFilesError, match="is a FIFO"):
        read_header(fifo)
    with pytest.raises(ModelFilesError, match="is a directory"):
        read_header(tmp_path)
    with pytest.raises(ModelFilesError, match="is a character device"):
        read_header("/dev/zero")
    with pytest.raises(ModelFilesError, match="no such"):
        read_header(tmp_path / "absent.gguf")


FUZZ = textwrap.dedent("""
    import random, struct, sys
    from pathlib import Path
    from acestep_gguf import ModelFilesError
    from acestep_gguf.runtime.gguf_header import read_header
    seed, n, sources, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:-1], Path(sys.argv[-1])
    rng = random.Random(seed)
    originals = [Path(s).read_bytes()[:200_000] for s in sources]
    parsed = refused = 0
    for i in range(n):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            how = rng.random()
            if how < 0.4:
                data[at] = rng.randrange(256)
            elif how < 0.7 and at + 8 <= len(data):
                data[at:at + 8] = struct.pack("<Q", rng.choice([0, 1, 3, 255, 1 << 31, 1 << 40, 1 << 62, 2**64 - 1]))
            elif how < 0.85:
                del data[at:]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        path = work / f"m{i % 4}.gguf"
        path.write_bytes(bytes(data))
        try:
            read_header(path)
            parsed += 1
        except ModelFilesError as e:
            assert "\\n" not in str(e)
            refused += 1
    print(parsed, refused)
""")


def test_fuzzed_headers_never_escape_as_anything_but_a_model_files_error(tmp_path, converted):
    """Seeded mutations of real files (both kinds), in a child process: an uncaught exception, a hang
    or a crash fails the test, not the test runner."""
    sources = [converted / "tiny-llava-F16.gguf", converted / "tiny-llava-Q8_0.gguf", converted / "mmproj-tiny-llava-F16.gguf"]
    done = subprocess.run([sys.executable, "-c", FUZZ, "20251125", "600", *map(str, sources), str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed, refused = map(int, done.stdout.split())
    assert parsed + refused == 600 and refused > 300  # most mutations are caught, none escapes


@pytest.mark.parametrize("name", ["tiny-llava-F16.gguf", "tiny-llava-Q8_0.gguf", "mmproj-tiny-llava-F16.gguf"])
def test_agrees_with_gguf_py_on_valid_files(converted, name):
    ours, reference = read_header(converted / name), GGUFReader(converted / name)
    assert set(ours.fields) == {k for k in reference.fields if not k.startswith("GGUF.")}
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.fields[key]
        expected = field.contents()
        if isinstance(value, LongArray):
            assert value.count == len(field.data), key
        elif isinstance(expected, float) or (isinstance(expected, list) and expected and isinstance(expected[0], float)):
            assert value == pytest.approx(expected), key
        else:
            assert value == expected, key
        assert ours.types[key][0] == field.types[0], key
    assert [(t.name, t.shape, t.type, t.n_bytes) for t in ours.tensors] == \
        [(t.name, tuple(int(d) for d in t.shape), t.tensor_type, int(t.n_bytes)) for t in reference.tensors]
