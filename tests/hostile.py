"""Helpers that make bad inputs out of good ones: GGUF files with edited metadata or tensors, real
mounts for a full disk and read-only media, and running the CLI in a child process (so a crash inside
llama.cpp fails the test instead of killing the test runner)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

KEEP = object()


def rewrite_gguf(src: Path, dst: Path, fields: dict | None = None, drop_fields=(), drop_tensors=(),
                 reshape: dict | None = None) -> Path:
    """Copy a non-quantized GGUF, replacing fields ({key: (value, type, element type)}), dropping
    fields or tensors, or giving tensors another shape."""
    fields, reshape = fields or {}, reshape or {}
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_fields or key in fields:
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    for key, (value, vtype, sub) in fields.items():
        if key == "general.architecture":
            continue
        writer.add_key_value(key, value, vtype, sub)
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        data = t.data.copy()
        if t.name in reshape:
            data = data.reshape(reshape[t.name])
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def cli_process(*args, timeout: float = 120, env: dict | None = None, input: str | None = None):
    """`python -m acestep_gguf ARGS` in a child: returncode, stdout, stderr (a SIGABRT shows as -6)."""
    return subprocess.run([sys.executable, "-m", "acestep_gguf", *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=timeout, input=input, env={**os.environ, **(env or {})})


def one_error_line(done, *needles) -> str:
    """The child failed cleanly: exit 1, exactly one 'error:' line on stderr, no traceback."""
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@contextmanager
def mounted(target: Path, *args: str):
    """mount(8) for the duration of the block (root only; skipped where mounting is not allowed)."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()}): needs root, as in CI")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def tmpfs(target: Path, size: str):
    return mounted(target, "-t", "tmpfs", "-o", f"size={size}", f"acestep-test-{uuid.uuid4().hex[:8]}")


def read_only_view(source: Path, target: Path):
    return mounted(target, "-o", "bind,ro", str(source))
