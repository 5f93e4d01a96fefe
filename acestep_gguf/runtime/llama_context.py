"""One loaded language model and its llama.cpp context, opened with exactly the parameters we need.

llama-cpp-python's ``Llama`` class makes a single-sequence context (its ``n_seq_max`` cannot be
set), so the runtime opens the model and the context itself: ``n_seq`` sequences, each with a
KV cache of its own ``n_ctx_seq`` positions (llama.cpp's split cache, see docs/performance.md
for why not the unified one). It offers what the rest of the runtime used of ``Llama``: ``model``,
``ctx``, ``n_ctx()``, ``n_batch``, ``n_threads``, ``close()``."""

from __future__ import annotations

import threading
from pathlib import Path

import llama_cpp

from .. import llama_log
from ..errors import ModelFilesError
from .kv_cache_types import CacheTypes

_backend = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


class LoadedModel:
    """A model file and one context over it; freed once by close()."""

    def __init__(self, path: Path, *, n_ctx_seq: int, n_seq: int = 1, n_threads: int, n_gpu_layers: int,
                 n_batch: int, n_ubatch: int, cache: CacheTypes, unified: bool = False):
        _init_backend()
        self.model = self.ctx = None
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ModelFilesError(f"{path}: llama.cpp could not load it ({llama_log.recent() or 'no reason given'})")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx_seq * n_seq
        cparams.n_seq_max = n_seq
        cparams.kv_unified = unified
        cparams.n_batch, cparams.n_ubatch = n_batch, n_ubatch
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.type_k, cparams.type_v = cache.ggml_k, cache.ggml_v
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if cache.flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)  # as Llama() set it
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise ModelFilesError(f"{path}: llama.cpp could not create a context of {n_seq} x {n_ctx_seq} positions "
                                  f"({llama_log.recent() or 'out of memory?'})")
        self.n_batch, self.n_threads, self.n_seq = n_batch, n_threads, n_seq

    def n_ctx(self) -> int:
        """Positions one sequence can hold."""
        return llama_cpp.llama_n_ctx_seq(self.ctx)

    def close(self) -> None:
        ctx, self.ctx = self.ctx, None
        model, self.model = self.model, None
        if ctx:
            llama_cpp.llama_free(ctx)
        if model:
            llama_cpp.llama_model_free(model)
