"""Several conversations decoded together (runtime/batch.py) against llama.cpp's own llama-batched-bench,
and what it buys `caption --parallel` and `serve --parallel`. Figures for docs/performance.md.

    python bench/batched.py --work /tmp/acestep-batched            # ~25 minutes on 2 cores, ~7 GB of disk

Models (random weights, so greedy answers never stop early: every turn is max_tokens long):
- "qwen2-290m": a Qwen2-shaped language model of 4 layers of 1536 x 8960 (12/2 heads), vocab 32768,
  Q4_K_M (the shape shared/README.md's llama-batched-bench figures were taken on), with a 2-layer CLIP
  at 224 px (256 image positions) — decode memory-bound, prefill cheap enough to caption with;
- "32b-slice": bench/scale.py's checkpoint generator with 2 Qwen2.5-32B layers and the 32B's untied
  152064 x 5120 embedding and output, Q4_K_M — each token reads ~1.2 GB;
(The demo model is left out: it is trained, ends its answers after ~10 tokens, and llama-batched-bench
ignores end-of-text, so the two would not decode the same number of tokens.)

1. Aggregate decode tokens/s at 1/2/4/8 sequences: ours (Batcher steps only, 32-token text prompts, 48
   generated per sequence) next to `llama-batched-bench -npp 32 -ntg 48 -npl 1,2,4,8 -fa off` on the same GGUF
   (flash attention off, as the runtime runs with an F16 cache)
   (built from the vendored tree by tools/build_llama_tool.sh).
2. `caption` pictures/s at --parallel 1/2/4 ("Describe this image.", 128- and 384-token answers, 8 pictures).
3. `serve`: 4 clients at once against --parallel 4, and against --parallel 1 (they queue).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench"), str(ROOT)]

THREADS = 2
TOOLS = Path(os.environ.get("ACESTEP_GGUF_TEST_DATA", Path.home() / ".cache/acestep-gguf/test-data")) / \
    "llama-cpp-python-0.3.36" / "bin"


def build_290m(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config
    import torch
    from builders import build_model, build_tokenizer, save_checkpoint
    tok = build_tokenizer()
    text = Qwen2Config(vocab_size=32768, hidden_size=1536, intermediate_size=8960, num_hidden_layers=4,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                       eos_token_id=tok.token_to_id("<|im_end|>"), bos_token_id=None)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=14)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=tok.token_to_id("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    save_checkpoint(build_model(config), tok, folder, dtype=torch.bfloat16, shards=2)
    return folder


def converted(work: Path, name: str) -> Path:
    from acestep_gguf import convert
    out = work / f"{name}-gguf"
    if not (out / "manifest.json").exists():
        ckpt = work / f"{name}-ckpt"
        if not (ckpt / "config.json").exists():
            if name == "qwen2-290m":
                build_290m(ckpt)
            else:
                from convert import write_checkpoint
                write_checkpoint(ckpt, 2, 2)
        convert(ckpt, out=out, quant="Q4_K_M", mmproj_quant="F16", name=name)
    return out


def ours(folder: Path, quant: str, n_seq: int, unified: bool = False, n_prompt: int = 32, n_gen: int = 48) -> dict:
    """Aggregate decode tokens/s of n_seq sequences decoded together (prefills not counted); ``unified``:
    llama.cpp's unified KV cache instead of the split one the runtime uses."""
    import functools
    from unittest import mock
    from acestep_gguf import VisionChat
    from acestep_gguf.runtime import chat as chat_module
    from acestep_gguf.runtime.batch import Batcher, Job
    from acestep_gguf.runtime.generation import SamplingOptions
    loaded = functools.partial(chat_module.LoadedModel, unified=unified)
    with mock.patch.object(chat_module, "LoadedModel", loaded), VisionChat.load(folder, quant=quant, n_ctx=2048, n_threads=THREADS, n_gpu_layers=0, parallel=n_seq) as chat:
        chat._acquire()
        try:
            batcher = Batcher(chat)
            options = SamplingOptions(max_tokens=n_gen)
            for i in range(n_seq):
                words = " ".join(f"w{(i * 7 + j) % 97}" for j in range(n_prompt))
                message = {"role": "user", "content": [{"type": "text", "text": words}]}
                batcher.start(Job([message], options, fresh=True), i)
            started, rows = time.perf_counter(), 0
            while batcher.active:
                rows += batcher.active
                batcher.step()
            seconds = time.perf_counter() - started
        finally:
            chat._release()
    return {"sequences": n_seq, "decode_tps": rows / seconds, "mean_width": batcher.counters.mean_width}


def llama_batched_bench(path: Path, widths: list[int], unified: bool) -> dict[int, float]:
    exe = TOOLS / "llama-batched-bench"
    if not exe.exists():
        return {}
    cmd = [str(exe), "-m", str(path), "-c", "4096", "-b", "2048", "-ub", "512", "-npp", "32", "-ntg", "48",
           "-npl", ",".join(map(str, widths)), "-t", str(THREADS), "-fa", "off", "--output-format", "jsonl"] + (["-kvu"] if unified else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    out = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            out[row["pl"]] = row["speed_tg"]
    return out


def caption_rate(folder: Path, quant: str, parallel: int, pictures: list[Path], tokens: int) -> dict:
    import tempfile
    from acestep_gguf import VisionChat
    from acestep_gguf.runtime.caption import caption_images
    with VisionChat.load(folder, quant=quant, n_ctx=1024, n_threads=THREADS, n_gpu_layers=0, parallel=parallel) as chat:
        out = Path(tempfile.mkdtemp()) / "c.jsonl"
        started = time.perf_counter()
        summary = caption_images(chat, pictures, "Describe this image.", out, max_tokens=tokens)
        seconds = time.perf_counter() - started
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    return {"parallel": parallel, "pictures_per_s": summary["captioned"] / seconds, "seconds": seconds,
            "tokens_per_caption": sum(r["completion_tokens"] for r in lines) / len(lines)}


def serve_rate(folder: Path, parallel: int, pictures: list[Path], tokens: int) -> dict:
    from test_server import Server, user
    s = Server(folder, "--parallel", str(parallel), "--threads", str(THREADS), "--gpu-layers", "0", quant="Q4_K_M")
    try:
        name = json.loads(s.get("/v1/models")[1])["data"][0]["id"]
        barrier, done = threading.Barrier(len(pictures) + 1), []

        def client(i):
            c = s.client()
            barrier.wait()
            done.append(c.chat.completions.create(model=name, messages=[user("Describe this image.", pictures[i])],
                                                  max_tokens=tokens).usage.completion_tokens)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(pictures))]
        for t in threads:
            t.start()
        barrier.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
    finally:
        s.stop()
    return {"parallel": parallel, "clients": len(pictures), "seconds": seconds, "tokens": sum(done)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/acestep-batched"))
    ap.add_argument("--skip-slice", action="store_true", help="leave out the 32B slice (~5 GB, ~5 minutes to make)")
    ap.add_argument("--parts", default="decode,caption,serve", help="which measurements, comma-separated")
    ap.add_argument("--reps", type=int, default=3, help="decode: the best of this many runs of each setting")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(3)
    pictures = []
    for i in range(8):
        path = args.work / f"pic{i}.png"
        Image.fromarray(rng.integers(0, 256, (300 + 20 * i, 400, 3), dtype=np.uint8)).save(path)
        pictures.append(path)
    models = {"qwen2-290m": converted(args.work, "qwen2-290m")}
    if not args.skip_slice:
        models["32b-slice"] = converted(args.work, "32b-slice")
    widths = [1, 2, 4, 8]
    result: dict = {"threads": THREADS, "decode": {}}
    parts = args.parts.split(",")
    for name, folder in models.items() if "decode" in parts else ():
        gguf = next(p for p in folder.glob("*-Q4_K_M.gguf"))
        best = lambda runs: max(runs, key=lambda r: r["decode_tps"])  # noqa: E731  (a busy moment only slows a run)
        rows = [best([ours(folder, "Q4_K_M", n) for _ in range(args.reps)]) for n in widths]
        ours_unified = {n: max(ours(folder, "Q4_K_M", n, unified=True)["decode_tps"] for _ in range(args.reps))
                        for n in widths}
        split, unified = ({n: max(r.get(n, 0) for r in runs) for n in widths} for runs in (
            [llama_batched_bench(gguf, widths, kvu) for _ in range(args.reps)] for kvu in (False, True)))
        for row in rows:
            row["unified_decode_tps"] = ours_unified[row["sequences"]]
            row["llama_batched_bench_tps"] = split.get(row["sequences"])
            row["llama_batched_bench_unified_tps"] = unified.get(row["sequences"])
        result["decode"][name] = rows
        print(json.dumps({name: rows}), flush=True)
    folder = models["qwen2-290m"]
    if "caption" in parts:
        result["caption"] = [caption_rate(folder, "Q4_K_M", n, pictures, tokens) for tokens in (128, 384)
                             for n in (1, 2, 4)]
        print(json.dumps({"caption": result["caption"]}), flush=True)
    if "serve" in parts:
        result["serve"] = [serve_rate(folder, n, pictures[:4], 128) for n in (1, 4)]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
