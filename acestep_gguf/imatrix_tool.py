"""`acestep-gguf imatrix`: an importance matrix for a converted model, calibrated on pictures with
questions and answers (the positions a vision-language model mostly sees) and on plain text, written
in llama.cpp's GGUF imatrix format (what `llama-quantize --imatrix` and `convert --imatrix` take).
With text alone it computes what `llama-imatrix -f FILE -c N` computes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import AcestepGGUFError, CancelledError, OptionError
from .files import read_bytes

HIGH_PRECISION = ("F16", "BF16", "Q8_0")  # calibrate on the closest to the checkpoint that is there
# long enough that the text after a picture makes a batch of 16+ positions (llama-imatrix's floor)
QUESTIONS = ("Describe this image in detail: the objects in it, their colours, sizes and positions, and any text.",
             "What is in this picture? Say what each thing is, what colour it is, and where it is in the picture.",
             "How many objects are there in this picture, and what shape and colour does each one have?")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_CONVERSATIONS_BYTES = 64 << 20
MAX_TEXT_BYTES = 1 << 30


@dataclass
class CalibrationSet:
    conversations: list  # [{"image": path, "question": str, "answer": str | None}]
    text: list[int] | None  # tokens
    datasets: list[str]


def load_conversations(images: Path | None, conversations: Path | None) -> list[dict]:
    out = []
    if conversations is not None:
        raw = read_bytes(conversations, OptionError, MAX_CONVERSATIONS_BYTES, "conversations file")
        for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):
                raise OptionError(f"{conversations}: line {number} is not JSON") from None
            if not (isinstance(item, dict) and isinstance(item.get("image"), str) and isinstance(item.get("question"), str)
                    and isinstance(item.get("answer", ""), str)):
                raise OptionError(f"{conversations}: line {number} needs \"image\" and \"question\" strings (and an "
                                  "optional \"answer\")")
            image = Path(item["image"])
            out.append({"image": image if image.is_absolute() else conversations.parent / image,
                        "question": item["question"], "answer": item.get("answer") or None})
    if images is not None:
        if not images.is_dir():
            raise OptionError(f"--images {images}: not a folder")
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not p.is_symlink())
        if not files:
            raise OptionError(f"--images {images}: no .jpg, .png or .webp pictures in it")
        out += [{"image": f, "question": QUESTIONS[i % len(QUESTIONS)], "answer": None} for i, f in enumerate(files)]
    return out


def compute(folder: Path, out: Path, *, images: Path | None = None, conversations: Path | None = None,
            text: Path | None = None, chunk_size: int = 512, quant: str | None = None, threads: int | None = None,
            progress: Callable[[int, int], None] = lambda done, total: None, plan: Callable[[str], None] = lambda s: None,
            verbose: bool = False) -> dict:
    """Write ``out``; returns a summary. Ctrl-C (or a failure) leaves no file behind."""
    from . import interrupts
    from .manifest import Manifest
    from .runtime.chat import VisionChat
    from .runtime.imatrix_collect import CalibrationContext, Collector
    from .runtime.model_files import store_reference
    if images is None and conversations is None and text is None:
        raise OptionError("give --images DIR, --conversations FILE.jsonl and/or --text FILE to calibrate on")
    if type(chunk_size) is not int or not 16 <= chunk_size <= 65536:
        raise OptionError(f"--chunk-size {chunk_size}: from 16 to 65536 tokens")
    folder, quant = store_reference(folder, quant)
    present = [f.type for f in Manifest.read(folder).files if f.role == "language"]
    quant = quant or next((t for t in HIGH_PRECISION if t in present), None)
    if quant is None:
        raise OptionError(f"{folder}: holds no F16, BF16 or Q8_0 language model to calibrate on (convert one with "
                          "--quant F16)")
    items = load_conversations(images, conversations)
    collector = Collector()
    n_ctx = max(chunk_size, 4096 if items else 1024)  # the chat needs room for a picture even for text
    partial = out.with_name(out.name + ".partial")
    with VisionChat.load(folder, quant=quant, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=0, verbose=verbose) as chat:
        tokens = None
        datasets = []
        if text is not None:
            raw = read_bytes(text, OptionError, MAX_TEXT_BYTES, "text file").decode("utf-8", "replace")
            tokens = chat._kv._tokenize(raw, special=False)
            if chat._kv.add_bos:
                tokens = [chat._kv.bos] + tokens
            if len(tokens) < 2 * chunk_size:
                raise OptionError(f"--text {text}: {len(tokens)} tokens; at least {2 * chunk_size} are needed for "
                                  f"chunks of {chunk_size} (as llama-imatrix needs)")
            datasets.append(str(text))
        if items:
            datasets.append(str(images or conversations))
        n_chunks = len(tokens) // chunk_size if tokens else 0
        total = n_chunks + len(items)
        plan(f"{n_chunks} text chunks of {chunk_size} tokens and {len(items)} picture conversations through "
             f"{chat.model_path.name}; on a CPU a 32B model takes about a minute per chunk or picture")
        calibration = CalibrationContext(chat, n_ctx, collector)
        try:
            with interrupts.deferred(collector.cancel.set):  # Ctrl-C: stop, then KeyboardInterrupt here
                try:
                    done = _calibrate(calibration, chat, tokens, chunk_size, n_chunks, items, progress, total)
                except CancelledError:
                    pass  # the interrupt is raised as the block ends; no file is written
            if collector.cancel.is_set():
                raise CancelledError("cancelled")
            if not collector.sums:
                raise AcestepGGUFError("nothing was collected (every batch was under 16 positions?)")
            write_imatrix(partial, collector, datasets, done, chunk_size)
            os.replace(partial, out)
        finally:
            calibration.close()
            partial.unlink(missing_ok=True)
    return {"out": str(out), "model": quant, "entries": len(collector.sums), "chunks": n_chunks,
            "conversations": len(items), "datasets": datasets}


def _calibrate(calibration, chat, tokens, chunk_size: int, n_chunks: int, items: list, progress, total: int) -> int:
    """Every text chunk, then every conversation, through the calibration context; returns how many."""
    from .runtime.imatrix_collect import run_conversation
    done = 0
    for i in range(n_chunks):
        chunk = tokens[i * chunk_size:(i + 1) * chunk_size]
        if chat._kv.add_bos:  # as llama-imatrix: BOS in place of each chunk's first token
            chunk = [chat._kv.bos] + chunk[1:]
        calibration.clear()
        calibration.decode(chunk)
        done += 1
        progress(done, total)
    for item in items:
        picture = chat.prepare_image(item["image"])
        messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                 {"type": "text", "text": item["question"]}]}]
        if item["answer"]:
            messages += [{"role": "assistant", "content": [{"type": "text", "text": item["answer"]}]},
                         {"role": "user", "content": [{"type": "text", "text": "Thank you."}]}]
        run_conversation(calibration, messages)
        done += 1
        progress(done, total)
    return done


def write_imatrix(path: Path, collector, datasets: list[str], chunks: int, chunk_size: int) -> None:
    """llama.cpp's GGUF imatrix format: <weight>.in_sum2 [ne0, n_mat] and <weight>.counts [1, n_mat]."""
    from gguf import GGUFWriter
    w = GGUFWriter(str(path), "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", datasets or ["unnamed"])
    w.add_uint32("imatrix.chunk_count", chunks)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(collector.sums):
        sums = collector.sums[name].astype(np.float32)
        w.add_tensor(name + ".in_sum2", sums.reshape(1, -1))
        w.add_tensor(name + ".counts", np.array([[float(collector.counts[name])]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
