"""Conversion benchmark: a generated checkpoint with ACE-Step 1.5's real layer shapes (Qwen2.5-32B
layers, 152064-row vocabulary, ViT-H/14 at 448 px; 8.3 GB with --layers 4), converted by
`acestep-gguf convert` in one pass and `--via-llama-quantize` (lossless intermediate + llama.cpp's
quantizer), for several --quant and --threads settings, each into a fresh folder.

Per run: wall time; peak anonymous memory of the converter process and peak extra disk (bytes in
the output folder beyond the finished outputs), both sampled every 20 ms; for one pass, the time
spent inside ggml's quantization kernels (timed around each call in the converter process). Next
to them: a plain sequential read of the same files (page cache warm, as for the runs).

    python bench/convert.py --layers 4 --work /tmp/acestep-bench
    python bench/convert.py --runs one-pass:Q8_0:1,one-pass:Q8_0:2,via:Q8_0:2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

TEXT = {"hidden_size": 5120, "intermediate_size": 27648, "num_attention_heads": 40, "num_key_value_heads": 8,
        "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "model_type": "qwen2",
        "rope_theta": 1000000.0, "tie_word_embeddings": False}
VISION = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "image_size": 448,
          "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "model_type": "clip_vision_model"}


def tensor_shapes(layers: int, vision_layers: int) -> dict[str, tuple[int, ...]]:
    e, f, kv, v, vf = 5120, 27648, 1024, 1280, 5120
    shapes = {"language_model.model.embed_tokens.weight": (152064, e), "language_model.lm_head.weight": (152064, e),
              "language_model.model.norm.weight": (e,)}
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
                       p + "self_attn.q_proj.weight": (e, e), p + "self_attn.q_proj.bias": (e,),
                       p + "self_attn.k_proj.weight": (kv, e), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.v_proj.bias": (kv,),
                       p + "self_attn.o_proj.weight": (e, e), p + "mlp.gate_proj.weight": (f, e),
                       p + "mlp.up_proj.weight": (f, e), p + "mlp.down_proj.weight": (e, f)})
    t = "vision_tower.vision_model."
    shapes.update({t + "embeddings.class_embedding": (v,), t + "embeddings.patch_embedding.weight": (v, 3, 14, 14),
                   t + "embeddings.position_embedding.weight": (1025, v), t + "pre_layrnorm.weight": (v,),
                   t + "pre_layrnorm.bias": (v,), t + "post_layernorm.weight": (v,), t + "post_layernorm.bias": (v,),
                   "multi_modal_projector.linear_1.weight": (e, v), "multi_modal_projector.linear_1.bias": (e,),
                   "multi_modal_projector.linear_2.weight": (e, e), "multi_modal_projector.linear_2.bias": (e,)})
    for i in range(vision_layers):
        p = f"{t}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (v, v)
            shapes[p + f"self_attn.{name}.bias"] = (v,)
        shapes.update({p + "layer_norm1.weight": (v,), p + "layer_norm1.bias": (v,), p + "layer_norm2.weight": (v,),
                       p + "layer_norm2.bias": (v,), p + "mlp.fc1.weight": (vf, v), p + "mlp.fc1.bias": (vf,),
                       p + "mlp.fc2.weight": (v, vf), p + "mlp.fc2.bias": (v,)})
    return shapes


def write_checkpoint(folder: Path, layers: int, vision_layers: int) -> int:
    """BF16 safetensors shards written tensor by tensor (random normal * 0.02), plus config files."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(layers, vision_layers)
    rng = np.random.default_rng(0)
    names = sorted(shapes)
    shard_of = {n: f"model-{(i % 4) + 1:05d}-of-00004.safetensors" for i, n in enumerate(names)}
    total = 0
    for shard in sorted(set(shard_of.values())):
        members = [n for n in names if shard_of[n] == shard]
        header, offset = {}, 0
        for n in members:
            size = int(np.prod(shapes[n])) * 2
            header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / shard, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for n in members:
                count = int(np.prod(shapes[n]))
                for start in range(0, count, 1 << 24):
                    block = (rng.standard_normal(min(1 << 24, count - start), dtype=np.float32) * 0.02)
                    (block.view(np.uint32) >> 16).astype(np.uint16).tofile(f)
        total += offset
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard_of}))
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "text_config": {**TEXT, "num_hidden_layers": layers}, "vision_config": {**VISION, "num_hidden_layers": vision_layers},
              "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
              "image_token_index": 151646}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = Path(__file__).resolve().parents[1] / "acestep_gguf" / "demo_model" / "tokenizer.json"
    tok = json.loads(tokenizer.read_text())
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return total


class Sampler:
    """Peak RssAnon of a process and peak bytes in a folder, every 20 ms."""

    def __init__(self, pid: int, folder: Path):
        self.pid, self.folder = pid, folder
        self.anon = self.disk = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in open(f"/proc/{self.pid}/status"):
                    if line.startswith("RssAnon:"):
                        self.anon = max(self.anon, int(line.split()[1]) * 1024)
            except FileNotFoundError:
                pass
            self.disk = max(self.disk, folder_bytes(self.folder))
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def folder_bytes(folder: Path) -> int:
    total = 0
    try:
        for entry in os.scandir(folder):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return total


def read_once(folder: Path) -> float:
    started = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - started


def child(route: str, quant: str, threads: int, ckpt: Path, out: Path) -> None:
    """In the measured process: convert, timing each call into ggml's kernels."""
    from acestep_gguf import convert
    from acestep_gguf.convert import ggml_kernels
    spent = [0.0]
    rows = ggml_kernels.Quantizer.rows

    def timed_rows(self, *args):
        t = time.perf_counter()
        try:
            return rows(self, *args)
        finally:
            spent[0] += time.perf_counter() - t
    ggml_kernels.Quantizer.rows = timed_rows
    convert(ckpt, out=out, quant=quant, mmproj_quant="F16", name="bench", threads=threads,
            via_llama_quantize=route == "via")
    print(json.dumps({"kernel_s": spent[0] if route == "one-pass" else None}))


def run(route: str, quant: str, threads: int, ckpt: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", f"{route}:{quant}:{threads}", "--work",
                             str(ckpt.parent)], stdout=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid, out)
    stdout, _ = proc.communicate()
    sampler.stop()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{route} {quant} {threads} failed with {proc.returncode}")
    outputs = folder_bytes(out)
    return {"route": route, "quant": quant, "threads": threads, "wall_s": wall,
            "kernel_s": json.loads(stdout.strip().splitlines()[-1])["kernel_s"], "peak_anon_bytes": sampler.anon,
            "outputs_bytes": outputs, "peak_extra_disk_bytes": sampler.disk - outputs}


DEFAULT_RUNS = ("one-pass:Q8_0:1,one-pass:Q8_0:2,via:Q8_0:2,one-pass:Q4_K_M:1,one-pass:Q4_K_M:2,via:Q4_K_M:2,"
                "one-pass:all:2,via:all:2")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/acestep-bench"))
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="route:quant:threads, comma-separated (route: one-pass or via)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ckpt, out = args.work / "ckpt", args.work / "out"
    if args.child:
        route, quant, threads = args.child.split(":")
        return child(route, quant, int(threads), ckpt, out)
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        size = write_checkpoint(ckpt, args.layers, args.vision_layers)
        print(f"generated {size / 1e9:.2f} GB checkpoint in {time.perf_counter() - t:.0f}s", flush=True)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    largest = max(int(np.prod(s)) for s in tensor_shapes(args.layers, args.vision_layers).values())
    read_s = min(read_once(ckpt) for _ in range(2))
    print(f"checkpoint {size / 1e9:.2f} GB, largest tensor {largest / 1e6:.1f} M elements, read once {read_s:.1f} s, "
          f"{os.cpu_count()} cores", flush=True)
    print("| route | --quant | threads | wall s | kernels s | wall / (read + kernels) | peak anon memory | "
          "peak extra disk | outputs |", flush=True)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for spec in args.runs.split(","):
        route, quant, threads = spec.split(":")
        r = run(route, quant, int(threads), ckpt, out)
        kernels = f"{r['kernel_s']:.1f}" if r["kernel_s"] is not None else "-"
        ratio = f"{r['wall_s'] / (read_s + r['kernel_s']):.2f}" if r["kernel_s"] is not None else "-"
        print(f"| {route} | {quant} | {threads} | {r['wall_s']:.1f} | {kernels} | {ratio} | "
              f"{r['peak_anon_bytes'] / 1e9:.2f} GB | {r['peak_extra_disk_bytes'] / 1e9:.2f} GB | "
              f"{r['outputs_bytes'] / 1e9:.2f} GB |", flush=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
