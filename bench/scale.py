"""Performance at ACE-Step 1.5's real scale, measured on slices with the real tensor shapes and set
against this machine's limits (memory bandwidth, matrix-multiply throughput, disk read).

    python bench/scale.py --work /tmp/acestep-scale            # ~9 GB of disk, ~20 minutes on 2 cores

1. a generated BF16 checkpoint: --layers Qwen2.5-32B layers (hidden 5120, FFN 27648, 40/8 heads,
   vocab 152064, untied) + the full CLIP ViT-H/14 at 448 px (32 layers, width 1280) + MLP projector;
2. conversion (bench/convert.py's measurement) to Q4_K_M and Q8_0;
3. image encoding: seconds per 448 px image, mmproj F16 and Q8_0, 1 and 2 threads, vs numpy matmul;
4. prefill and decode of the language slice at Q4_K_M / Q5_K_M / Q8_0 vs the memory-bandwidth bound;
5. extrapolation to the 64-layer model and a 12 GB-card estimate from the offload planner.
Prints one JSON object; docs/performance.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from convert import read_once, timed, write_checkpoint  # noqa: E402

from acestep_gguf import VisionChat, convert as run_convert  # noqa: E402
from acestep_gguf.models.presets import PRESETS  # noqa: E402
from acestep_gguf.runtime.offload import plan, shape_from_preset  # noqa: E402

GIB = 1 << 30


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9


def read_bandwidth_gbs(size: int = 1 << 30, reps: int = 5) -> float:
    """Streaming read of a 1 GiB array (numpy sum), best of reps: the decode bound's denominator."""
    a = np.ones(size // 8, dtype=np.float64)
    a.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return size / min(times) / 1e9


def vit_flops(p: dict) -> float:
    """Multiply-adds × 2 for one image: patch conv, the layers llama.cpp runs, the projector."""
    n = (p["v_image"] // p["v_patch"]) ** 2 + 1
    v, ff, e = p["v_embd"], p["v_ff"], p["n_embd"]
    per_layer = 2 * n * (4 * v * v + 2 * v * ff) + 2 * 2 * n * n * v
    return 2 * (n - 1) * 3 * p["v_patch"] ** 2 * v + p["v_layer"] * per_layer + 2 * (n - 1) * (v * e + e * e)


def image_encoding(folder: Path, mmproj_types, threads_list, reps: int) -> list[dict]:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (448, 448, 3), np.uint8))
    out = []
    for mm in mmproj_types:
        for threads in threads_list:
            with VisionChat.load(folder, quant="Q8_0", mmproj_quant=mm, n_ctx=2048, n_threads=threads,
                                 n_gpu_layers=0) as chat:
                times = []
                for _ in range(reps):
                    t = time.perf_counter()
                    chat.encode_image(image)
                    times.append(time.perf_counter() - t)
            out.append({"mmproj": mm, "threads": threads, "seconds": statistics.median(times)})
    return out


def language_speed(folder: Path, quant: str, threads: int, n_prompt: int, n_decode: int, reps: int) -> dict:
    import llama_cpp

    from acestep_gguf import llama_log
    llama_log.install(False)
    path = next(folder.glob(f"*-{quant}.gguf"))
    llm = llama_cpp.Llama(str(path), n_ctx=n_prompt + n_decode + 8, n_threads=threads, n_batch=n_prompt,
                          n_ubatch=n_prompt, verbose=False)
    llama_log.install(False)
    rng = np.random.default_rng(0)
    prefill, decode = [], []
    try:
        for _ in range(reps):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
            tokens = (llama_cpp.llama_token * n_prompt)(*rng.integers(10, 300, n_prompt).tolist())
            t = time.perf_counter()
            assert llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(tokens, n_prompt)) == 0
            prefill.append(n_prompt / (time.perf_counter() - t))
            one = (llama_cpp.llama_token * 1)(42)
            t = time.perf_counter()
            for _ in range(n_decode):
                assert llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
            decode.append(n_decode / (time.perf_counter() - t))
    finally:
        llm.close()
    from gguf import GGUFReader
    reader = GGUFReader(path)
    layer_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk."))
    output_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("output"))
    return {"quant": quant, "threads": threads, "prefill_tps": statistics.median(prefill),
            "decode_tps": statistics.median(decode), "bytes_per_token": layer_bytes + output_bytes,
            "layer_bytes": layer_bytes, "output_bytes": output_bytes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/acestep-scale"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    p = PRESETS["ace-step-1.5"]
    result: dict = {"machine": {"cores": os.cpu_count()}}
    result["machine"]["numpy_matmul_gflops"] = matmul_gflops()
    result["machine"]["read_bandwidth_gbs"] = read_bandwidth_gbs()

    ckpt, out = args.work / "ckpt", args.work / "gguf"
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        write_checkpoint(ckpt, args.layers, 32)
        result["generate_s"] = time.perf_counter() - t
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    reads = [read_once(ckpt) for _ in range(2)]
    conversions = {}
    for quant, mm in (("Q8_0", "F16"), ("Q4_K_M", "Q8_0")):
        seconds, peak = timed([sys.executable, "-m", "acestep_gguf", "convert", str(ckpt), "--out", str(out),
                               "--quant", quant, "--mmproj-quant", mm, "--quiet", "--name", "slice"])
        conversions[f"{quant}+mmproj {mm}"] = {"seconds": seconds, "peak_anon_bytes": peak}
    run_convert(ckpt, out=out, quant="Q8_0,Q4_K_M,Q5_K_M", mmproj_quant="F16", name="slice")  # reuses the above
    result["conversion"] = {"checkpoint_bytes": size, "read_once_s": min(reads), "runs": conversions}

    result["image_encoding"] = {"flops_per_image": vit_flops(p),
                                "runs": image_encoding(out, ("F16", "Q8_0"), (1, 2), args.reps)}
    for run in result["image_encoding"]["runs"]:
        run["gflops"] = result["image_encoding"]["flops_per_image"] / run["seconds"] / 1e9

    bandwidth = result["machine"]["read_bandwidth_gbs"]
    speeds = []
    for quant in ("Q4_K_M", "Q5_K_M", "Q8_0"):
        s = language_speed(out, quant, 2, 256, 32, args.reps)
        s["decode_bound_tps"] = bandwidth * 1e9 / s["bytes_per_token"]
        s["decode_fraction_of_bound"] = s["decode_tps"] / s["decode_bound_tps"]
        # 64 layers: decode time scales with bytes read per token (layers + output matrix); prefill
        # time with the layers only (the output matrix is applied to the last prompt token alone)
        full_bytes = 64 * s["layer_bytes"] / args.layers + s["output_bytes"]
        prefill_64 = s["prefill_tps"] * args.layers / 64
        s["extrapolated_64_layers"] = {"decode_tps": s["decode_tps"] * s["bytes_per_token"] / full_bytes,
                                       "prefill_tps": prefill_64, "image_prefill_s_1024_tokens": 1024 / prefill_64}
        speeds.append(s)
    result["language"] = speeds

    shape = shape_from_preset("ace-step-1.5", "Q4_K_M")
    card = plan(shape, 12 * GIB, 8192)
    cpu_bytes = sum(shape.layer_bytes[card.n_gpu_layers:]) + shape.other_bytes.get("output.weight", 0)
    gpu_bytes = sum(shape.layer_bytes[:card.n_gpu_layers])
    estimates = {}
    for ram, ram_gbs in (("DDR4-3200 dual channel", 40.0), ("DDR5-5600 dual channel", 70.0)):
        seconds = cpu_bytes / (ram_gbs * 1e9) + gpu_bytes / (360e9)
        estimates[ram] = {"decode_tps": 1 / seconds}
    result["card_12gb"] = {"n_gpu_layers": card.n_gpu_layers, "cpu_bytes_per_token": cpu_bytes,
                           "gpu_bytes_per_token": gpu_bytes, "gpu_bandwidth_gbs_assumed": 360,
                           "estimates": estimates}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
