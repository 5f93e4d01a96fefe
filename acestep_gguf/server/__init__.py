"""`acestep-gguf serve`: OpenAI- and Ollama-compatible HTTP APIs and a chat page over one model."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
from pathlib import Path

from ..errors import OptionError
from ..runtime.kv_cache_types import CacheTypes
from ..runtime.offload import AUTO_PARALLEL

DEFAULT_PORT = 8080


def server_threads() -> int:
    """The default for serve: all cores but one. A desktop server shares the machine; with every core
    busy a request waits for the scheduler on each token (measured: docs/performance.md)."""
    from ..system import default_threads
    return max(1, default_threads() - 1)


def cache_folder_problem(folder: Path) -> str | None:
    """Why a --cache-dir cannot hold states (one line), or None."""
    if folder.is_symlink() and not folder.exists():
        return "a dangling symlink"
    if folder.exists() and not folder.is_dir():
        return "not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot be created ({e.strerror})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "not writable"
    return None


def serve(folder: Path | None, *, quant: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          api_key: str | None = None, n_ctx: int = 8192, n_threads: int | None = None, n_gpu_layers="auto",
          vram=None, cache_dir: Path | None = None, cache_size: int = 4 << 30, max_image_bytes: int = 16 << 20,
          cors_origins: list[str] | None = None, allowed_hosts: list[str] | None = None, body_timeout_s: float = 30.0,
          models: Path | None = None, max_loaded: int = 1, keep_alive: str = "5m", max_memory: int | None = None,
          cache_type_k: str = "f16", cache_type_v: str = "f16", parallel: int | str = "auto",
          verbose: bool = False) -> None:
    """Serve one model (``folder``: a converted folder or a store name) or, with ``folder`` None, every
    model of the store (``models``, default the user's) until SIGINT / SIGTERM: then running streams
    end with their final chunk, the conversation states are saved, and it returns (exit code 0).
    ``parallel``: slots, the requests a model answers at once (decoded together)."""
    import uvicorn

    from ..model_store import ModelStore
    from ..runtime.model_files import store_reference
    from .app import Settings, create_app
    from .connections import GuardedH11, quiet_logs, raise_open_file_limit
    from .guard import is_loopback
    from .pool import ModelPool, keep_alive_seconds
    from .limits import RequestError

    api_key = api_key or os.environ.get("ACESTEP_GGUF_API_KEY") or None
    if not is_loopback(host) and not api_key:
        raise OptionError(f"--host {host}: serving beyond this machine needs --api-key (or ACESTEP_GGUF_API_KEY)")
    if not 1 <= port <= 65535:
        raise OptionError(f"--port {port}: a port from 1 to 65535")
    if cache_dir is not None:
        why = cache_folder_problem(Path(cache_dir))
        if why:
            raise OptionError(f"--cache-dir {cache_dir}: {why} (give a writable folder, or 'none')")
    if not 1 <= max_loaded <= 64:
        raise OptionError(f"--max-loaded {max_loaded}: from 1 to 64")
    try:
        default_keep = keep_alive_seconds(keep_alive, "--keep-alive")
    except RequestError as e:
        raise OptionError(e.message) from None
    os.environ["HF_HUB_OFFLINE"] = "1"  # the server never downloads (/api/pull converts from the local cache)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_logs()
    raise_open_file_limit()
    threads = n_threads or server_threads()
    cache = CacheTypes.parse(cache_type_k, cache_type_v)

    def load(model_folder: Path, model_quant: str | None):
        return load_engine(model_folder, model_quant, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers,
                           vram=vram, cache_dir=cache_dir, cache_size=cache_size, cache=cache, parallel=parallel,
                           verbose=verbose)

    slots_bound = parallel if isinstance(parallel, int) else AUTO_PARALLEL[0]  # what a model may take before it loads

    if folder is not None:
        folder, quant = store_reference(folder, quant)
        engine = load(folder, quant)  # at start: a broken model is one line now, not on the first request
        pool = ModelPool(load, fixed=(engine.name, folder, engine.chat.quant))
        pool.pin(engine, model_memory(folder, engine.chat.quant, n_ctx * engine.chat.parallel, cache))
    else:
        store = ModelStore(models)
        pool = ModelPool(load, store=store, max_loaded=max_loaded, keep_alive=default_keep,
                         max_bytes=max_memory or memory_budget(),
                         memory_of=lambda f, q: model_memory(f, q, n_ctx * slots_bound, cache))
    settings = Settings(host=host, api_key=api_key, cors_origins=cors_origins or [], allowed_hosts=allowed_hosts or [],
                        max_image_bytes=max_image_bytes, body_timeout_s=body_timeout_s)
    config = uvicorn.Config(create_app(pool, settings), host=host, port=port, http=GuardedH11,
                            log_level="info" if verbose else "warning", timeout_graceful_shutdown=5,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=16 << 10, backlog=256)
    _server(config, pool.shutdown).run()


def load_engine(folder: Path, quant: str | None, *, n_ctx: int, n_threads: int, n_gpu_layers, vram,
                cache_dir: Path | None, cache_size: int, cache: CacheTypes, verbose: bool, parallel: int | str = 1):
    """One model ready to serve: the loaded VisionChat, its saved-state store (a subfolder per model
    identity — its files, the context and the KV cache types — under ``cache_dir``) and the facts the
    APIs report about it."""
    from ..manifest import Manifest
    from ..runtime.chat import VisionChat
    from .engine import Engine
    from .store import StateLimits, StateStore
    chat = VisionChat.load(folder, quant=quant, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                           vram=vram, cache_type_k=cache.k, cache_type_v=cache.v, parallel=parallel, verbose=verbose)
    manifest = Manifest.read(folder)
    used = [f for f in manifest.files if f.file in (chat.files.model.name, chat.files.mmproj.name)]
    # another cache type is another state format: a state of one is a cache miss for the other, never loaded
    identity = f"{[(f.file, f.sha256) for f in used]}:{n_ctx}" + (f":{cache.k}:{cache.v}" if cache.quantized else "")
    model_id = hashlib.sha256(identity.encode()).hexdigest()[:16]
    store = StateStore(cache_size, Path(cache_dir) if cache_dir is not None else None, model_id,
                       StateLimits(chat.n_ctx, chat.n_vocab, chat.pixel_recipe))
    engine = Engine(chat, store, manifest.name)
    engine.n_ctx, engine.digest = n_ctx, model_id
    engine.details = {"format": "gguf", "family": manifest.source.get("family", ""), "families": None,
                      "quantization_level": chat.quant, "parameter_size": "", "parent_model": ""}
    return engine


def model_memory(folder: Path, quant: str | None, n_ctx: int, cache: CacheTypes) -> int:
    """What a model takes in memory once loaded: its files and its KV cache (the planner's figures)."""
    from ..runtime.model_files import resolve
    from ..runtime.offload import kv_bytes_per_layer, shape_from_gguf
    files = resolve(folder, quant=quant)
    shape = shape_from_gguf(files.model, files.mmproj)
    return files.model.stat().st_size + files.mmproj.stat().st_size + \
        kv_bytes_per_layer(shape, n_ctx, cache) * len(shape.layer_bytes)


def memory_budget() -> int:
    """Three quarters of the machine's memory, for the models a store server keeps loaded."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.75)
    except (ValueError, OSError):
        return 8 << 30


def _server(config, on_signal):
    """uvicorn's server, told of a shutdown signal first (so the running generation stops and its
    stream gets its final chunk), and not re-raising the signal afterwards (exit code 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            on_signal()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server(config)
