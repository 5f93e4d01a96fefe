"""`acestep-gguf imatrix`: with text alone it computes what llama.cpp's own llama-imatrix computes (built
from the vendored source of the pinned llama-cpp-python by tools/build_llama_cpp.sh); with pictures
it also sees the image positions, which llama-imatrix cannot; its files are what `llama-quantize
--imatrix` and `convert --imatrix` take; bad calibration inputs and Ctrl-C are one line, nothing left."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from builders import CORPUS, save_checkpoint
from gguf import GGUFReader
from hostile import cli_process, one_error_line
from spm_vocab import DATA
from test_one_pass import qwen2

from acestep_gguf import convert
from acestep_gguf.demo import DEMO_CHECKPOINT, demo_question


def tool(name: str):
    path = DATA / "bin" / name
    if not path.is_file():
        pytest.fail(f"{path} missing; run tools/build_llama_cpp.sh (the README's setup step)")
    return path


def tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data, np.float64).ravel() for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def model(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    ckpt = save_checkpoint(qwen2(tokenizer, hidden=256, ff=512, layers=3, heads=8, kv_heads=2), tokenizer, root / "ckpt",
                           dtype=torch.bfloat16)
    convert(ckpt, out=root / "gguf", quant="F16", name="m")
    (root / "text.txt").write_text(" ".join(CORPUS) * 3)
    return ckpt, root / "gguf", root / "text.txt"


def test_text_calibration_equals_llama_imatrix(model, tmp_path):
    _, folder, text = model
    ours = cli_process("imatrix", folder, "--out", tmp_path / "ours.gguf", "--text", text, "--chunk-size", "64", "--json")
    assert ours.returncode == 0, ours.stderr
    ref = subprocess.run([str(tool("llama-imatrix")), "-m", str(folder / "m-F16.gguf"), "-f", str(text), "-c", "64",
                          "-b", "64", "-t", "2", "--no-ppl", "-o", str(tmp_path / "ref.gguf")], capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    a, b = tensors(tmp_path / "ours.gguf"), tensors(tmp_path / "ref.gguf")
    assert set(a) == set(b) and len(b) == 3 * 7 * 2  # every matrix of every layer: sums and counts
    for name in b:
        scale = max(np.abs(b[name]).max(), 1e-30)
        assert np.abs(a[name] - b[name]).max() / scale < 1e-4, name  # float32 summation order only
    assert all(np.array_equal(a[n], b[n]) for n in b if n.endswith(".counts"))
    fields = {k: f.contents() for k, f in GGUFReader(tmp_path / "ours.gguf").fields.items()}
    assert (fields["general.type"], fields["imatrix.chunk_size"], fields["imatrix.chunk_count"]) == ("imatrix", 64, 182)


def test_llama_quantize_takes_our_file_and_convert_writes_its_very_file(model, tmp_path):
    ckpt, folder, text = model
    out = tmp_path / "m.imatrix"
    assert cli_process("imatrix", folder, "--out", out, "--text", text, "--chunk-size", "64").returncode == 0
    convert(ckpt, out=tmp_path / "lossless", quant="F16", name="m")
    theirs = tmp_path / "theirs-IQ2_XS.gguf"
    done = subprocess.run([str(tool("llama-quantize")), "--imatrix", str(out), str(tmp_path / "lossless" / "m-F16.gguf"),
                           str(theirs), "IQ2_XS", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = convert(ckpt, out=tmp_path / "ours", quant="IQ2_XS", name="m", imatrix=out)
    fields = {k: f.contents() for k, f in GGUFReader(theirs).fields.items() if k.startswith("quantize.")}
    assert fields["quantize.imatrix.entries_count"] == 21 and fields["quantize.imatrix.file"] == str(out)
    assert (tmp_path / "ours" / "m-IQ2_XS.gguf").read_bytes() == theirs.read_bytes()  # the whole file


def test_pictures_are_calibrated_too(tmp_path):
    folder = tmp_path / "demo"
    convert(DEMO_CHECKPOINT, out=folder, quant="F16", name="demo")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for seed in range(4):
        demo_question(random.Random(seed))[0].save(pictures / f"p{seed}.png")
    lines = [json.dumps({"image": f"pictures/p{s}.png", "question": "What shape is this?", "answer": "A circle."})
             for s in range(2)]
    (tmp_path / "talk.jsonl").write_text("\n".join(lines) + "\n")
    done = cli_process("imatrix", folder, "--out", tmp_path / "m.imatrix", "--images", pictures, "--conversations",
                       tmp_path / "talk.jsonl", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["conversations"], summary["chunks"], summary["entries"]) == (6, 0, 14)
    counts = tensors(tmp_path / "m.imatrix")
    # image positions count: 64 per picture (8x8 patches) reach every layer but the last one's FFN/output
    assert counts["blk.0.ffn_up.weight.counts"][0] > 6 * 64 > counts["blk.1.ffn_up.weight.counts"][0]
    made = convert(DEMO_CHECKPOINT, out=tmp_path / "q", quant="IQ2_XS", name="demo", imatrix=tmp_path / "m.imatrix")
    assert made.source["imatrix"]["datasets"] == [str(pictures)]


@pytest.mark.parametrize("args,needle", [
    (["--images", "EMPTY"], "no .jpg, .png or .webp pictures"),
    (["--conversations", "BADJSON"], "line 1 is not JSON"),
    (["--conversations", "BADTYPES"], "needs \"image\" and \"question\" strings"),
    (["--text", "FIFO"], "is a FIFO"),
    (["--text", "SHORT"], "at least 128 are needed"),
    ([], "give --images DIR"),
    (["--text", "SHORT", "--chunk-size", "8"], "--chunk-size 8"),
])
def test_bad_calibration_inputs_are_one_line(model, tmp_path, args, needle):
    _, folder, _ = model
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "BADJSON").write_text("{not json\n")
    (tmp_path / "BADTYPES").write_text(json.dumps({"image": 3, "question": "q"}) + "\n")
    os.mkfifo(tmp_path / "FIFO")
    (tmp_path / "SHORT").write_text("hello world")
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    one_error_line(cli_process("imatrix", folder, "--out", tmp_path / "o.gguf", *args, "--chunk-size",
                               args[-1] if "--chunk-size" in args else "64", timeout=120), needle)
    assert not list(tmp_path.glob("o.gguf*"))


def test_ctrl_c_leaves_no_file(model, tmp_path):
    _, folder, _ = model
    (tmp_path / "long.txt").write_text(" ".join(CORPUS) * 200)
    proc = subprocess.Popen([sys.executable, "-m", "acestep_gguf", "imatrix", str(folder), "--out",
                             str(tmp_path / "o.gguf"), "--text", str(tmp_path / "long.txt"), "--chunk-size", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-1000:]
    assert not list(tmp_path.glob("o.gguf*"))


def test_one_command_from_checkpoint_to_calibrated_low_bit_files(tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for seed in range(3):
        demo_question(random.Random(seed))[0].save(pictures / f"p{seed}.png")
    done = cli_process("convert", DEMO_CHECKPOINT, "--out", tmp_path / "out", "--name", "demo", "--quant",
                       "IQ2_M,Q4_K_M", "--calibrate", pictures, "--json", timeout=600)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert sorted(f["type"] for f in manifest["files"] if f["role"] == "language") == ["F16", "IQ2_M", "Q4_K_M"]
    assert (tmp_path / "out" / "demo.imatrix").is_file()
    assert manifest["source"]["imatrix"]["file"] == "demo.imatrix"
    assert manifest["source"]["imatrix"]["datasets"] == [str(pictures)]
