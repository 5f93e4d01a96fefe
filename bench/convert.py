"""Conversion benchmark: a generated checkpoint with ACE-Step 1.5's real layer shapes (Qwen2.5-32B
layers, 152064-row vocabulary, ViT-H/14 at 448 px), converted with `acestep-gguf convert --quant Q8_0`.

Reports wall time, input throughput and peak anonymous memory of the converter process (sampled
from /proc/PID/status every 20 ms), next to a plain sequential read of the same files and
llama.cpp's quantizer alone on the same lossless intermediate.

    python bench/convert.py --layers 4 --work /tmp/acestep-bench      # ~7 GB checkpoint
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


def peak_anon_kib(pid: int, stop: threading.Event, result: list) -> None:
    peak = 0
    while not stop.is_set():
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        except FileNotFoundError:
            break
        time.sleep(0.02)
    result.append(peak)


def timed(cmd: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=peak_anon_kib, args=(proc.pid, stop, peak))
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{cmd} failed with {code}")
    return time.perf_counter() - started, peak[0] * 1024


def read_once(folder: Path) -> float:
    started = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/acestep-bench"))
    args = ap.parse_args()
    ckpt, out = args.work / "ckpt", args.work / "out"
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        size = write_checkpoint(ckpt, args.layers, args.vision_layers)
        print(f"generated {size / 1e9:.2f} GB checkpoint in {time.perf_counter() - t:.0f}s", flush=True)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    largest = max(int(np.prod(s)) for s in tensor_shapes(args.layers, args.vision_layers).values())
    reads = [read_once(ckpt) for _ in range(2)]
    convert_s, peak = timed([sys.executable, "-m", "acestep_gguf", "convert", str(ckpt), "--out", str(out),
                             "--quant", "Q8_0", "--force", "--quiet"])
    # the quantizer alone, on the same lossless intermediate
    from acestep_gguf.convert import pipeline
    from acestep_gguf.convert.checkpoint import open_checkpoint
    from acestep_gguf.convert.gguf_stream import write_gguf
    from acestep_gguf.convert.language import language_file
    from acestep_gguf.convert.plan import make_plan
    from acestep_gguf.convert.quantize import quantize
    from acestep_gguf.convert.safetensors_file import TensorReader
    from acestep_gguf.convert.vision import vision_file
    c = open_checkpoint(ckpt)
    plan = make_plan(c, pipeline.detect(c.config))
    write_s = quant_s = 0.0
    for arch, (meta, tensors), target in (("qwen2", language_file(plan, c, "bench")[:2], "Q8_0"),
                                          ("clip", vision_file(plan, "bench"), "F16")):
        lossless = args.work / "lossless.gguf"
        t = time.perf_counter()
        write_gguf(lossless, arch, meta, tensors, TensorReader())
        write_s += time.perf_counter() - t
        t = time.perf_counter()
        quantize(lossless, args.work / "q.gguf", target)
        quant_s += time.perf_counter() - t
        lossless.unlink()
        (args.work / "q.gguf").unlink()
    result = {"checkpoint_bytes": size, "largest_tensor_elements": largest, "read_once_s": min(reads),
              "convert_s": convert_s, "convert_gb_per_s": size / convert_s / 1e9, "peak_anon_bytes": peak,
              "peak_goal_bytes": 8 * largest + 600_000_000, "lossless_write_s": write_s,
              "llama_quantize_alone_s": quant_s, "threads": os.cpu_count()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
