"""`convert --imatrix FILE`: importance matrices in llama.cpp's GGUF format and the legacy .dat format,
applied as `llama-quantize --imatrix` applies them. Every output — the IQ2 types, IQ3_XXS and Q2_K_S
that need one, and the types whose rules change with one — is byte-identical to what
`llama_model_quantize` writes given the same matrix (its quantize.imatrix.* keys included); a file
that is malformed, foreign or not finite is one line before anything is written."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from builders import save_checkpoint
from gguf import GGUFReader, GGUFWriter
from hostile import cli_process, one_error_line
from test_one_pass import qwen2, same_files

from acestep_gguf import convert
from acestep_gguf.convert.imatrix import read_imatrix

NEEDING = "IQ2_XXS,IQ2_XS,IQ2_S,IQ2_M,IQ3_XXS,Q2_K_S"
CHANGED = "Q4_0,IQ4_XS,Q3_K_M,Q4_K_M"  # rules that differ with an imatrix, and ones that only use it
MATRICES = (("attn_q", 0), ("attn_k", 0), ("attn_v", 0), ("attn_output", 0), ("ffn_gate", 0), ("ffn_up", 0),
            ("ffn_down", 1))


def widths(layers: int, hidden: int, ff: int) -> dict[str, int]:
    return {f"blk.{i}.{m}.weight": (ff if down else hidden) for i in range(layers) for m, down in MATRICES}


def write_gguf_imatrix(path, entries: dict[str, int], seed: int = 0, *, chunks: int = 10, sums=None) -> None:
    """An importance matrix as llama-imatrix writes it (general.type imatrix, .in_sum2 and .counts)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["calibration.txt"])
    w.add_uint32("imatrix.chunk_count", chunks)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, ne0 in entries.items():
        values = sums(name, ne0) if sums else rng.random((1, ne0), dtype=np.float32) * 100 + 1e-3
        w.add_tensor(name + ".in_sum2", np.asarray(values, np.float32).reshape(1, ne0))
        w.add_tensor(name + ".counts", np.array([[512.0 * chunks]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_dat_imatrix(path, entries: dict[str, np.ndarray], calls: int, chunks: int, dataset: str) -> None:
    """The legacy format: values stored times the number of calls."""
    out = struct.pack("<i", len(entries))
    for name, values in entries.items():
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", calls, values.size)
        out += (values.astype(np.float32) * np.float32(calls)).astype("<f4").tobytes()
    out += struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()
    path.write_bytes(out)


@pytest.fixture(scope="module")
def model(tokenizer, tmp_path_factory):
    """Qwen2-shaped, 256-wide rows everywhere but ffn_down (512), 9 layers, GQA 4:1."""
    root = tmp_path_factory.mktemp("imatrix")
    ckpt = save_checkpoint(qwen2(tokenizer, hidden=256, ff=512, layers=9, heads=8, kv_heads=2), tokenizer, root / "ckpt",
                           dtype=torch.bfloat16)
    write_gguf_imatrix(root / "model.imatrix", widths(9, 256, 512))
    return ckpt, root / "model.imatrix"


def test_every_type_with_an_imatrix_equals_llama_quantize(model, tmp_path):
    ckpt, imatrix = model
    types = NEEDING + "," + CHANGED
    one = convert(ckpt, out=tmp_path / "one", quant=types, name="m", imatrix=imatrix, threads=2)
    ref = convert(ckpt, out=tmp_path / "ref", quant=types, name="m", imatrix=imatrix, via_llama_quantize=True)
    same_files(one, ref)
    fields = {k: f.contents() for k, f in GGUFReader(tmp_path / "one" / "m-IQ2_XS.gguf").fields.items()}
    assert (fields["quantize.imatrix.file"], fields["quantize.imatrix.dataset"]) == (str(imatrix), "calibration.txt")
    assert (fields["quantize.imatrix.entries_count"], fields["quantize.imatrix.chunks_count"]) == (63, 10)
    types_of = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "one" / "m-IQ3_XXS.gguf").tensors}
    assert types_of["blk.3.attn_q.weight"] == "IQ2_S" and types_of["output.weight"] == "Q5_K"
    q4 = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "one" / "m-Q4_0.gguf").tensors}
    assert q4["blk.0.ffn_down.weight"] == "Q4_1"  # the imatrix-only guard for Q4_0's first layers
    # the imatrix does change the bytes: Q4_K_M without one is another file
    plain = convert(ckpt, out=tmp_path / "plain", quant="Q4_K_M", name="m")
    assert plain.files[0].sha256 != next(f for f in one.files if f.file == "m-Q4_K_M.gguf").sha256
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["source"]["imatrix"]["sha256"] == read_imatrix(imatrix).sha256
    assert manifest["source"]["imatrix"]["datasets"] == ["calibration.txt"]


def test_the_legacy_dat_format_reads_as_llama_quantize_reads_it(tmp_path):
    importance = {n: np.full(w, 2.0 ** -(i % 5), np.float32) for i, (n, w) in enumerate(widths(2, 64, 128).items())}
    write_dat_imatrix(tmp_path / "legacy.dat", importance, calls=4, chunks=7, dataset="wiki.train.raw")
    read = read_imatrix(tmp_path / "legacy.dat")
    assert (read.chunks, read.datasets) == (7, ("wiki.train.raw",))
    assert all(np.array_equal(read.entries[n], v) for n, v in importance.items())


def test_types_that_need_one_say_how_to_get_one(model, tmp_path):
    ckpt, _ = model
    one_error_line(cli_process("convert", ckpt, "--out", tmp_path / "o", "--quant", "IQ2_M"), "--imatrix FILE")
    assert not (tmp_path / "o").exists()


def hostile(path, which: str) -> None:
    entries = widths(9, 256, 512)
    if which == "another model's names":
        write_gguf_imatrix(path, {**entries, "blk.99.attn_q.weight": 256})
    elif which == "another model's widths":
        write_gguf_imatrix(path, {**entries, "blk.0.attn_q.weight": 128})
    elif which == "layers missing":
        write_gguf_imatrix(path, {n: w for n, w in entries.items() if not n.startswith("blk.8.")})
    elif which == "NaN":
        write_gguf_imatrix(path, entries, sums=lambda name, ne0: np.full(ne0, np.nan, np.float32))
    elif which == "truncated":
        write_gguf_imatrix(path, entries)
        path.write_bytes(path.read_bytes()[:5000])
    elif which == "dat with a huge count":
        path.write_bytes(struct.pack("<i", 1_000_000_000) + b"\x00" * 64)
    elif which == "dat cut short":
        write_dat_imatrix(path, {n: np.ones(w, np.float32) for n, w in entries.items()}, 3, 1, "x")
        path.write_bytes(path.read_bytes()[:-200])
    elif which == "not a model's matrix":
        w = GGUFWriter(str(path), "llama")
        w.add_string("general.type", "model")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
    elif which == "a directory":
        path.mkdir()
    else:
        os.mkfifo(path)


@pytest.mark.parametrize("which,needle", [
    ("another model's names", "names no weight"), ("another model's widths", "has 128 columns"),
    ("layers missing", "no entry for blk.8."), ("NaN", "non-finite"), ("truncated", "not a valid importance matrix"),
    ("dat with a huge count", "cannot fit"), ("dat cut short", "runs past the end"),
    ("not a model's matrix", "general.type is not 'imatrix'"), ("a directory", "imatrix"), ("a FIFO", "imatrix"),
])
def test_bad_importance_matrices_are_one_line_and_nothing_is_written(model, tmp_path, which, needle):
    ckpt, _ = model
    bad = tmp_path / "bad.imatrix"
    hostile(bad, which)
    done = cli_process("convert", ckpt, "--out", tmp_path / "o", "--quant", "IQ2_XS", "--imatrix", bad, timeout=60)
    one_error_line(done, needle)
    assert not (tmp_path / "o").exists()
