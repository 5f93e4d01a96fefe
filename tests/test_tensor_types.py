"""The type-choice mirror (convert/tensor_types.py) against llama.cpp's own choice over a sweep of
model shapes no test could afford to convert: llama.cpp exports the function its quantizer uses
(`llama_quant_compute_types`, with a model built from metadata, src/llama-ext.h; C++ names, so
called by their mangled symbols). test_one_pass.py checks the same on real files."""

from __future__ import annotations

import ctypes
import itertools
import pathlib

import llama_cpp
import pytest
from gguf import GGMLQuantizationType as Q

from acestep_gguf.convert.one_pass import plan_types
from acestep_gguf.convert.gguf_stream import OutTensor
from acestep_gguf.convert.safetensors_file import SourceTensor
from acestep_gguf.convert.tensor_types import quantizer_order
from acestep_gguf.models.hparams import TextHParams
from acestep_gguf.models.llava_llama import LLAMA
from acestep_gguf.models.llava_qwen2 import QWEN2
from acestep_gguf.quant_types import TYPES

LIB = pathlib.Path(llama_cpp.__file__).resolve().parent / "lib"


class Desc(ctypes.Structure):  # llama_quant_model_desc
    _fields_ = [("architecture", ctypes.c_char_p)] + [(n, ctypes.c_uint32) for n in (
        "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")]


class InitParams(ctypes.Structure):  # ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class LlamaCppChoice:
    def __init__(self):
        self.llama = ctypes.CDLL(str(next(LIB.glob("libllama.so*"))))
        self.ggml = ctypes.CDLL(str(next(LIB.glob("libggml-base.so*"))))
        sym = lambda lib, name: getattr(lib, name)  # noqa: E731
        self.from_metadata = sym(self.llama, "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc")
        self.from_metadata.restype, self.from_metadata.argtypes = ctypes.c_void_p, [ctypes.POINTER(Desc)]
        self.init = sym(self.llama, "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params")
        self.init.restype, self.init.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]
        self.compute = sym(self.llama, "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem")
        self.compute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
        self.free = sym(self.llama, "_Z16llama_quant_freeP19quantize_state_impl")
        self.free.argtypes = [ctypes.c_void_p]
        self.llama.llama_model_free.argtypes = [ctypes.c_void_p]
        self.ggml.ggml_init.restype, self.ggml.ggml_init.argtypes = ctypes.c_void_p, [InitParams]
        self.ggml.ggml_new_tensor.restype = ctypes.c_void_p
        self.ggml.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
        self.ggml.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.ggml.ggml_free.argtypes = [ctypes.c_void_p]
        self.params = llama_cpp.llama_model_quantize_default_params()

    def types(self, arch: str, h: dict, tensors: list[tuple[str, tuple[int, ...], Q]], ftype: int) -> list[Q]:
        desc = Desc(arch.encode(), h["n_embd"], h["n_ff"], h["n_layer"], h["n_head"], h["n_head_kv"], 0,
                    h["n_embd"] // h["n_head"], h["n_embd"] // h["n_head"])
        model = self.from_metadata(ctypes.byref(desc))
        qs = self.init(model, ctypes.addressof(self.params))
        ctx = self.ggml.ggml_init(InitParams(64 << 20, None, True))
        try:
            handles = (ctypes.c_void_p * len(tensors))()
            for i, (name, ne, qtype) in enumerate(tensors):
                dims = (ctypes.c_int64 * len(ne))(*ne)
                handles[i] = self.ggml.ggml_new_tensor(ctx, int(qtype), len(ne), dims)
                self.ggml.ggml_set_name(handles[i], name.encode())
            out = (ctypes.c_int * len(tensors))()
            self.compute(qs, ftype, handles, out, len(tensors))
            return [Q(v) for v in out]
        finally:
            self.ggml.ggml_free(ctx)
            self.free(qs)
            self.llama.llama_model_free(model)


def language_tensors(h: dict, tied: bool, bias: bool) -> list[OutTensor]:
    """A decoder's tensors as our planner lists them (PyTorch shapes, lossless types: BF16 matrices,
    F32 vectors), without data."""
    e, f, v, kv = h["n_embd"], h["n_ff"], h["n_vocab"], h["n_head_kv"] * (h["n_embd"] // h["n_head"])
    shapes = {"token_embd.weight": (v, e), "output_norm.weight": (e,)}
    if not tied:
        shapes["output.weight"] = (v, e)
    for i in range(h["n_layer"]):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (e,), b + "attn_q.weight": (e, e), b + "attn_k.weight": (kv, e),
                       b + "attn_v.weight": (kv, e), b + "attn_output.weight": (e, e), b + "ffn_norm.weight": (e,),
                       b + "ffn_gate.weight": (f, e), b + "ffn_up.weight": (f, e), b + "ffn_down.weight": (e, f)})
        if bias:
            shapes.update({b + "attn_q.bias": (e,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
    return [OutTensor(name, SourceTensor(name, pathlib.Path("x"), "BF16", shape, 0, 0),
                      Q.BF16 if len(shape) == 2 else Q.F32) for name, shape in shapes.items()]


WIDTHS = [  # (n_embd, n_ff, n_vocab): real models, and rows that hit each fallback
    (5120, 27648, 152064), (4096, 11008, 32064), (3584, 18944, 152064), (256, 320, 512), (96, 200, 1000),
    (64, 128, 320), (48, 72, 100),
]
LAYERS = [1, 2, 3, 5, 8, 9, 10, 16, 17, 24, 28, 32, 40, 64, 80]


@pytest.fixture(scope="module")
def llama_cpp_choice():
    return LlamaCppChoice()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_mirror_chooses_what_llama_cpp_chooses(arch, llama_cpp_choice):
    language = {"qwen2": QWEN2, "llama": LLAMA}[arch]
    compared = 0
    for (e, f, v), n_layer, (heads, kv_heads), tied in itertools.product(WIDTHS, LAYERS, [(8, 8), (8, 2), (8, 1)],
                                                                         [False, True]):
        if arch == "qwen2" and n_layer == 80:
            continue  # the metadata-built model marks only llama as 70B; the real loader also marks an
            # 80-layer qwen2 (src/models/qwen2.cpp): test_one_pass.py checks that on a real file
        h = {"n_embd": e, "n_ff": f, "n_vocab": v, "n_layer": n_layer, "n_head": heads, "n_head_kv": kv_heads}
        tensors = language_tensors(h, tied, bias=arch == "qwen2")
        by_name = {t.gguf_name: t for t in tensors}
        ordered = [by_name[n] for n in quantizer_order(list(by_name))]
        infos = [(t.gguf_name, tuple(reversed(t.source.shape)), t.out_type) for t in ordered]
        for quant in TYPES.values():
            shape = TextHParams(n_vocab=v, n_embd=e, n_ff=f, n_layer=n_layer, n_head=heads, n_head_kv=kv_heads,
                                head_dim=e // heads)
            ours = plan_types(ordered, quant, n_layer, language.is_70b(shape), heads // kv_heads)
            theirs = llama_cpp_choice.types(arch, h, infos, int(quant.file_type))
            wrong = [(t.gguf_name, a.name, b.name) for t, a, b in zip(ordered, ours, theirs) if a != b]
            assert not wrong, (arch, h, tied, quant.name, wrong[:3])
            compared += len(ordered)
    assert compared > 100_000
