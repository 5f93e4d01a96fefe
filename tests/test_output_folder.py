"""The output folder as other processes and real disks see it: one conversion at a time, leftovers
of a killed run cleaned, no writes on a run with nothing to do (read-only media), a full disk named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hostile import read_only_view, tmpfs
from test_convert_errors import assert_clean_failure, cli

from acestep_gguf.convert import pipeline

HOLD_LOCK = ("import fcntl, os, sys, time\n"
             "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "fcntl.flock(fd, fcntl.LOCK_EX)\n"
             "print('locked', flush=True)\n"
             "time.sleep(120)\n")


def test_a_second_conversion_into_the_same_folder_is_refused(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # another conversion is running there
        assert_clean_failure(cli("convert", tiny_checkpoint, "--out", out), "another conversion is writing here")
        assert list(out.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    assert cli("convert", tiny_checkpoint, "--out", out, "--quiet").exit_code == 0  # free again once it ends


def test_leftovers_of_a_killed_run_are_removed_and_a_no_op_run_writes_nothing(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    assert cli("convert", tiny_checkpoint, "--out", out, "--quant", "Q8_0", "--quiet").exit_code == 0
    manifest = out / "manifest.json"
    stamp = (manifest.stat().st_ino, manifest.stat().st_mtime_ns)
    (out / "tiny-llava-lossless.gguf.partial").write_bytes(b"\0" * 100_000)  # as left by kill -9 mid-run
    (out / "manifest.json.partial").write_text("{")
    again = cli("convert", tiny_checkpoint, "--out", out, "--quant", "Q8_0")
    assert again.exit_code == 0 and "kept (unchanged) tiny-llava-Q8_0.gguf" in again.stderr
    assert not list(out.glob("*.partial"))
    assert (manifest.stat().st_ino, manifest.stat().st_mtime_ns) == stamp


def test_a_no_op_run_works_on_read_only_media(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    assert cli("convert", tiny_checkpoint, "--out", out, "--quant", "Q8_0", "--quiet").exit_code == 0
    with read_only_view(out, tmp_path / "ro") as ro:
        again = cli("convert", tiny_checkpoint, "--out", ro, "--quant", "Q8_0")
        assert again.exit_code == 0, again.output
        assert "kept (unchanged) tiny-llava-Q8_0.gguf" in again.stderr
        more = cli("convert", tiny_checkpoint, "--out", ro, "--quant", "F16", "--quiet")  # something to write
        assert_clean_failure(more, "Read-only file system")


def test_too_little_room_is_said_before_writing(tmp_path, tiny_checkpoint):
    with tmpfs(tmp_path / "small", "64k") as small:
        assert_clean_failure(cli("convert", tiny_checkpoint, "--out", small / "o"), "MB free", "needs about")


@pytest.mark.parametrize("route,room", [([], "100k"), (["--via-llama-quantize"], "520k")])
def test_a_disk_that_fills_up_during_quantization_is_named(tmp_path, tiny_checkpoint, monkeypatch, route, room):
    """One pass: the Q8_0 file (132 kB) does not fit in 100 kB. Via llama.cpp's quantizer: the lossless
    intermediate (469 kB) fits in 520 kB, the Q8_0 file after it does not, and llama.cpp itself says
    only 'basic_ios::clear: iostream error'. The up-front space check is switched off to get there."""
    monkeypatch.setattr(pipeline, "_check_space", lambda *args: None)
    with tmpfs(tmp_path / "full", room) as full:
        result = cli("convert", tiny_checkpoint, "--out", full / "o", "--quant", "Q8_0", *route)
        assert_clean_failure(result, "no space left on device while writing tiny-llava-Q8_0.gguf")
        assert not (full / "o").exists() or not list((full / "o").iterdir())
