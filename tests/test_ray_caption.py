"""`caption --ray` on a real local Ray cluster (loopback only, started by the run): the same records
as the single-process `caption`, exactly one line per image whatever dies — a worker killed by its PID,
the driver killed and the command run again — and a worker with another model refused before work."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from test_cli import cli

from acestep_gguf import ModelFilesError, convert
from acestep_gguf.demo import DEMO_CHECKPOINT
from acestep_gguf.shapes import draw, random_scene

pytest.importorskip("ray", reason="the [ray] extra is part of the dev install")
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "demo-gguf"
    convert(DEMO_CHECKPOINT, out=folder, quant="Q8_0", name="acestep-demo")
    return folder


def pictures(folder, n: int, broken: int = 2):
    folder.mkdir()
    rng = random.Random(9)
    for i in range(n):
        draw(random_scene(rng), rng).save(folder / f"p{i:03d}.png")
    for i in range(broken):
        (folder / f"broken{i}.jpg").write_bytes(b"not a picture")
    return folder


def records(path) -> dict:
    lines = path.read_text().splitlines()
    out = {}
    for line in lines:
        record = json.loads(line)  # every line whole
        assert record["image"] not in out, f"{record['image']} twice"
        out[record["image"]] = record
    return out


def test_two_workers_give_the_single_process_captions(tmp_path, demo, monkeypatch):
    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)
    folder = pictures(tmp_path / "pics", 20)
    single, spread = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    assert cli("caption", folder, "-m", demo, "--out", single, "--max-tokens", "16").exit_code == 0
    result = cli("caption", folder, "-m", demo, "--out", spread, "--max-tokens", "16", "--ray", "local",
                 "--workers", "2", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["captioned"], summary["failed"], summary["workers"]) == (20, 2, 2)
    assert records(spread) == records(single)
    again = cli("caption", folder, "-m", demo, "--out", spread, "--ray", "local", "--json")
    assert json.loads(again.stdout)["skipped"] == 22 and len(spread.read_text().splitlines()) == 22


def test_a_worker_killed_by_its_pid_loses_nothing(tmp_path, demo, monkeypatch):
    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)
    from acestep_gguf.runtime.ray_caption import caption_with_ray
    folder = pictures(tmp_path / "pics", 60, broken=0)
    out = tmp_path / "out.jsonl"
    killed = []

    def progress(p):
        if not killed:
            pids = subprocess.run(["pgrep", "-f", "ray::Captioner"], capture_output=True, text=True).stdout.split()
            assert len(pids) == 2
            os.kill(int(pids[0]), signal.SIGKILL)
            killed.append(pids[0])

    files = sorted(folder.iterdir())
    summary = caption_with_ray(demo, files, "What shape is this?", out, workers=2, max_tokens=8, on_progress=progress)
    assert killed and summary["captioned"] == 60
    assert set(records(out)) == {str(p) for p in files}  # every image exactly once


def test_a_killed_driver_resumes_without_duplicates(tmp_path, demo):
    folder = pictures(tmp_path / "pics", 60, broken=1)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "acestep_gguf", "caption", str(folder), "-m", str(demo), "--out", str(out),
           "--max-tokens", "8", "--ray", "local", "--workers", "2"]
    env = {**os.environ, **LOOPBACK}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 8):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the cluster it started, mid-run
    proc.wait(30)
    partial = len(out.read_bytes().splitlines())
    assert 8 <= partial < 61
    done = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["skipped"] >= partial - 1
    assert set(records(out)) == {str(p) for p in sorted(folder.iterdir())}  # 61 images, each once, no torn line


def test_a_worker_with_another_model_is_refused_before_any_work(tmp_path, demo, monkeypatch):
    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)
    from acestep_gguf.runtime.ray_caption import caption_with_ray
    folder = pictures(tmp_path / "pics", 4, broken=0)
    out = tmp_path / "out.jsonl"
    with pytest.raises(ModelFilesError, match="holds another model: manifest.json sha256"):
        caption_with_ray(demo, sorted(folder.iterdir()), "Describe it.", out, workers=2, expected_sha256="0" * 64)
    assert not out.exists() or out.read_text() == ""
    refused = cli("caption", folder, "-m", demo, "--out", out, "--ray", "local", "--model-sha256", "f" * 64)
    assert refused.exit_code == 1 and "holds another model" in refused.stderr and len(refused.stderr.splitlines()) == 1
