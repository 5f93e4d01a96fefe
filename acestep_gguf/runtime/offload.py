"""The VRAM planner: how many transformer layers fit on the GPU next to the KV cache, the compute
buffers and the vision projector. The formula is documented in docs/offload.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import llama_cpp

from ..errors import OptionError
from ..models.presets import PRESETS, language_tensor_bytes, mmproj_bytes
from ..quant_types import TYPES, VISION_TYPES
from .kv_cache_types import CacheTypes
from .gguf_header import read_header
from ..models.registry import by_name, for_gguf
from .model_files import check_file, fields_of

MIB = 1 << 20
MARGIN_FIXED = 512 * MIB  # CUDA context, cuBLAS workspace, fragmentation
MARGIN_FRACTION = 0.05
N_UBATCH = 512  # llama.cpp's default micro-batch, which sizes the compute buffer


@dataclass
class ModelShape:
    """What the planner needs to know of a model, from a GGUF or from a preset."""

    layer_bytes: list[int]
    other_bytes: dict[str, int]  # token_embd (stays on the CPU), output, output_norm
    n_head: int
    n_head_kv: int
    head_dim: int
    n_embd: int
    n_ff: int
    n_vocab: int
    mmproj_bytes: int
    v_n_pos: int
    v_embd: int
    v_ff: int
    v_head: int
    image_tokens: int = 0  # the most context positions one picture takes (its tower's worst case)


@dataclass
class OffloadPlan:
    n_layers: int
    n_gpu_layers: int
    output_on_gpu: bool
    language_weights_bytes: int  # the whole language model
    gpu_weights_bytes: int  # the part of it placed on the GPU
    kv_cache_bytes: int  # K and V on the GPU for the offloaded layers
    kv_cache_total_bytes: int  # all layers
    mmproj_bytes: int
    mmproj_compute_bytes: int
    compute_bytes: int
    margin_bytes: int
    vram_budget_bytes: int
    headroom_bytes: int
    n_ctx: int
    reason: str
    image_tokens: int = 0  # the most context positions one picture takes

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(value: str | int | float, option: str = "--vram") -> int:
    """'12GiB', '12 GB', '11.5G', '800MiB' → bytes (G and GiB are 2**30, GB is 10**9). A bare number
    is refused (is 12 twelve bytes or twelve gigabytes?); a Python int is a byte count."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise OptionError(f"{option} {value}: a size cannot be negative")
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(i?B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise OptionError(f"{option} {value!r}: give a size with a unit, such as 12GiB, 11.5GB or 800MiB")
    base = 1000 if (m.group(3) or "").upper() == "B" else 1024
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper()))


def size_formatter(value: str | int | float | None):
    """Print sizes in the unit family the user wrote: GiB for 'GiB'/'G', GB for 'GB'."""
    decimal = isinstance(value, str) and re.search(r"\d\s*[KMGT]B\s*$", value, re.IGNORECASE) is not None
    base, suffix = (1000, "B") if decimal else (1024, "iB")

    def fmt(n: int) -> str:
        for unit in "TGM":
            scale = base ** " KMGT".index(unit)
            if abs(n) >= scale / 10 or unit == "M":
                return f"{n / scale:.2f} {unit}{suffix}"
        return f"{n} B"
    return fmt


def shape_from_gguf(model: Path, mmproj: Path | None) -> ModelShape:
    """Real tensor byte counts from the files (headers only, checked first)."""
    lm = read_header(model, "language model")
    check_file(fields_of(lm), Path(model), "language")  # every key used below is present, typed and in range
    mp = None
    if mmproj is not None:
        mp = read_header(mmproj, "mmproj")
        check_file(fields_of(mp), Path(mmproj), "vision")
    return shape_from_headers(lm, mp)


def shape_from_headers(lm, mp) -> ModelShape:
    """The planner's view of headers that check_file has accepted."""
    f = lm.fields
    arch = f["general.architecture"]
    n_layer = int(f[f"{arch}.block_count"])
    layers = [0] * n_layer
    other: dict[str, int] = {}
    for t in lm.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) < n_layer:
            layers[int(m.group(1))] += t.n_bytes
        else:
            other[t.name] = t.n_bytes
    n_head, n_embd = int(f[f"{arch}.attention.head_count"]), int(f[f"{arch}.embedding_length"])
    n_vocab = next(t.shape[1] for t in lm.tensors if t.name == "token_embd.weight")
    v = {"bytes": 0, "n_pos": 0, "embd": 0, "ff": 0, "head": 0, "tokens": 0}
    if mp is not None:
        g = mp.fields
        tower = for_gguf(g, "vision").vision
        h = tower.gguf_hparams(g)
        v = {"bytes": sum(t.n_bytes for t in mp.tensors), "n_pos": h.v_n_pos,
             "embd": int(g["clip.vision.embedding_length"]), "ff": int(g["clip.vision.feed_forward_length"]),
             "head": int(g["clip.vision.attention.head_count"]), "tokens": tower.max_image_tokens(h)}
    return ModelShape(layers, other, n_head, int(f.get(f"{arch}.attention.head_count_kv", n_head)),
                      int(f.get(f"{arch}.attention.key_length", n_embd // n_head)), n_embd,
                      int(f[f"{arch}.feed_forward_length"]), n_vocab,
                      v["bytes"], v["n_pos"], v["embd"], v["ff"], v["head"], v["tokens"])


def shape_from_preset(preset: str, quant: str, mmproj_quant: str = "F16") -> ModelShape:
    if preset not in PRESETS:
        raise OptionError(f"--preset {preset}: unknown; choose from {', '.join(PRESETS)}")
    if quant not in TYPES:
        raise OptionError(f"--quant {quant}: choose from {', '.join(TYPES)}")
    if mmproj_quant not in VISION_TYPES:
        raise OptionError(f"--mmproj-quant {mmproj_quant}: choose from {', '.join(VISION_TYPES)}")
    card = PRESETS[preset]
    layers, other = language_tensor_bytes(card, quant)
    t, v = card.text, card.vision
    return ModelShape(layers, other, t.n_head, t.n_head_kv, t.head_dim, t.n_embd, t.n_ff, t.n_vocab,
                      mmproj_bytes(card, mmproj_quant), v.v_n_pos, v.v_embd, v.v_ff, v.v_head,
                      by_name(card.family).vision.max_image_tokens(v))


def compute_bytes(s: ModelShape, n_ctx: int) -> int:
    """llama.cpp's GPU compute buffer for one micro-batch, estimated from its largest live tensors:
    logits, attention scores (without flash attention), and the FFN / residual activations (F32)."""
    return 4 * N_UBATCH * (s.n_vocab + s.n_head * n_ctx + 2 * s.n_ff + 4 * s.n_embd)


def mmproj_compute_bytes(s: ModelShape) -> int:
    """One image through the vision tower: activations of one layer plus its attention scores (F32)."""
    return 4 * (2 * s.v_n_pos * (s.v_ff + 4 * s.v_embd) + s.v_head * s.v_n_pos ** 2)


def kv_bytes_per_layer(s: ModelShape, n_ctx: int, cache: CacheTypes = CacheTypes()) -> int:
    """K and V of one layer for n_ctx positions, in the cache's element types."""
    return int(cache.bytes_per_token_layer(s.n_head_kv, s.head_dim) * n_ctx)


def plan(s: ModelShape, vram: int, n_ctx: int, gpu_available: bool = True,
         cache: CacheTypes = CacheTypes()) -> OffloadPlan:
    """Place as many whole layers as fit after the fixed costs; the output layer goes last."""
    n_layer = len(s.layer_bytes)
    total = sum(s.layer_bytes) + sum(s.other_bytes.values())
    kv_layer = kv_bytes_per_layer(s, n_ctx, cache)
    margin = MARGIN_FIXED + int(MARGIN_FRACTION * vram)
    fixed = compute_bytes(s, n_ctx) + s.mmproj_bytes + mmproj_compute_bytes(s) + margin
    n_gpu, used = 0, fixed
    if gpu_available and vram > 0:
        for layer in s.layer_bytes:
            if used + layer + kv_layer > vram:
                break
            used += layer + kv_layer
            n_gpu += 1
    output = s.other_bytes.get("output.weight", 0) + s.other_bytes.get("output_norm.weight", 0)
    output_on_gpu = n_gpu == n_layer and used + output <= vram
    if output_on_gpu:
        used += output
    if not gpu_available:
        reason = ("this llama-cpp-python build has no GPU support: everything runs on the CPU "
                  "(rebuild it with CMAKE_ARGS=-DGGML_CUDA=on to offload)")
    elif vram <= fixed:
        reason = "the budget does not cover the compute buffers, the mmproj and the safety margin"
    else:
        reason = f"{n_gpu} of {n_layer} layers fit" + (" plus the output layer" if output_on_gpu else "")
    gpu_weights = sum(s.layer_bytes[:n_gpu]) + (output if output_on_gpu else 0)
    on_gpu = n_gpu > 0
    return OffloadPlan(
        n_layers=n_layer, n_gpu_layers=n_gpu + (1 if output_on_gpu else 0) if on_gpu else 0,
        output_on_gpu=output_on_gpu, language_weights_bytes=total, gpu_weights_bytes=gpu_weights,
        kv_cache_bytes=kv_layer * n_gpu, kv_cache_total_bytes=kv_layer * n_layer,
        mmproj_bytes=s.mmproj_bytes, mmproj_compute_bytes=mmproj_compute_bytes(s),
        compute_bytes=compute_bytes(s, n_ctx), margin_bytes=margin, vram_budget_bytes=vram,
        headroom_bytes=vram - (used if on_gpu else 0), n_ctx=n_ctx, reason=reason, image_tokens=s.image_tokens)


def best_fit(shape_of: Callable[[str], ModelShape], types: Sequence[str], vram: int, n_ctx: int,
             cache: CacheTypes = CacheTypes()) -> tuple[str | None, OffloadPlan]:
    """The first of ``types`` (largest first) that puts every repeating layer on the GPU (the output
    layer too if it fits), with its plan; (None, the last type's plan) when none does."""
    result = None
    for type_name in types:
        result = plan(shape_of(type_name), vram, n_ctx, True, cache)
        if result.n_gpu_layers >= result.n_layers:
            return type_name, result
    return None, result


def detect_vram() -> int | None:
    """Free memory of the first NVIDIA GPU, if nvidia-smi can tell."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.splitlines()[0].strip()) * MIB
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


AUTO_PARALLEL = (4, 2, 1)  # 4: where the gain levels off on 2 cores (docs/performance.md, bench/batched.py)
KV_SHARE_OF_RAM = 0.25  # the most of free RAM that auto may give to the KV caches of the extra sequences


def auto_parallel(plan_for: Callable[[int], OffloadPlan], available_ram: int | None) -> int:
    """How many sequences ``parallel="auto"`` holds: the most of AUTO_PARALLEL whose KV caches cost
    no GPU layer (on a card the weights come first) and keep the host's share of the cache within
    a quarter of free RAM."""
    one = plan_for(1)
    for n in AUTO_PARALLEL[:-1]:
        p = plan_for(n)
        on_host = p.kv_cache_total_bytes - p.kv_cache_bytes
        if p.n_gpu_layers >= one.n_gpu_layers and (available_ram is None or on_host <= KV_SHARE_OF_RAM * available_ram):
            return n
    return 1


def offload_planner(model: Path, mmproj: Path | None, vram=None, *, headers=None,
                    cache: CacheTypes = CacheTypes()) -> Callable[[int], OffloadPlan]:
    """The plan for any context length (all sequences' positions together), with the model's shape,
    this build's GPU support and the given or free VRAM found once (nvidia-smi is a subprocess)."""
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    budget = parse_size(vram) if vram is not None else (detect_vram() or 0) if gpu else 0
    shape = shape_from_headers(*headers) if headers else shape_from_gguf(Path(model), Path(mmproj) if mmproj else None)
    return lambda n_ctx: plan(shape, budget, n_ctx, gpu, cache)


def plan_offload(model: Path, mmproj: Path | None, vram=None, n_ctx: int = 8192, *, headers=None,
                 cache: CacheTypes = CacheTypes()) -> OffloadPlan:
    """What n_gpu_layers='auto' uses: the real files (or their already checked ``headers``, a
    (language model, mmproj) pair), this build's GPU support, the given or free VRAM."""
    return offload_planner(model, mmproj, vram, headers=headers, cache=cache)(n_ctx)
