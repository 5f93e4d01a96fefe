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


def serve(folder: Path, *, quant: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          api_key: str | None = None, n_ctx: int = 8192, n_threads: int | None = None, n_gpu_layers="auto",
          vram=None, cache_dir: Path | None = None, cache_size: int = 4 << 30, max_image_bytes: int = 16 << 20,
          cors_origins: list[str] | None = None, allowed_hosts: list[str] | None = None, body_timeout_s: float = 30.0,
          verbose: bool = False) -> None:
    """Load the model and serve until SIGINT / SIGTERM: then running streams end with their final
    chunk, the conversation states are saved, and it returns (exit code 0)."""
    import uvicorn

    from ..manifest import Manifest
    from ..runtime.chat import VisionChat
    from .app import Settings, create_app, is_loopback
    from .connections import GuardedH11, quiet_logs, raise_open_file_limit
    from .engine import Engine
    from .store import StateLimits, StateStore

    api_key = api_key or os.environ.get("ACESTEP_GGUF_API_KEY") or None
    if not is_loopback(host) and not api_key:
        raise OptionError(f"--host {host}: serving beyond this machine needs --api-key (or ACESTEP_GGUF_API_KEY)")
    if not 1 <= port <= 65535:
        raise OptionError(f"--port {port}: a port from 1 to 65535")
    if cache_dir is not None:
        why = cache_folder_problem(Path(cache_dir))
        if why:
            raise OptionError(f"--cache-dir {cache_dir}: {why} (give a writable folder, or 'none')")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_logs()
    raise_open_file_limit()
    chat = VisionChat.load(folder, quant=quant, n_ctx=n_ctx, n_threads=n_threads or server_threads(),
                           n_gpu_layers=n_gpu_layers, vram=vram, verbose=verbose)
    manifest = Manifest.read(folder)
    used = [f for f in manifest.files if f.file in (chat.files.model.name, chat.files.mmproj.name)]
    model_id = hashlib.sha256(f"{[(f.file, f.sha256) for f in used]}:{n_ctx}".encode()).hexdigest()[:16]
    limits = StateLimits(chat.n_ctx, chat.n_vocab, chat.image_size)
    store = StateStore(cache_size, Path(cache_dir) if cache_dir is not None else None, model_id, limits)
    engine = Engine(chat, store, manifest.name)
    settings = Settings(host=host, api_key=api_key, cors_origins=cors_origins or [], allowed_hosts=allowed_hosts or [],
                        max_image_bytes=max_image_bytes, body_timeout_s=body_timeout_s, n_ctx=n_ctx, model_bytes=sum(f.bytes for f in used),
                        model_digest=model_id, details={"format": "gguf", "family": manifest.source.get("family", ""),
                                                        "quantization_level": chat.quant, "parameter_size": ""})
    config = uvicorn.Config(create_app(engine, settings), host=host, port=port, http=GuardedH11,
                            log_level="info" if verbose else "warning", timeout_graceful_shutdown=5,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=16 << 10, backlog=256)
    _server(config, engine.shutdown).run()


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
