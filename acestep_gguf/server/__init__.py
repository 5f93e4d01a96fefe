"""`acestep-gguf serve`: OpenAI- and Ollama-compatible HTTP APIs and a chat page over one model."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from ..errors import OptionError

DEFAULT_PORT = 8080


def serve(folder: Path, *, quant: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          api_key: str | None = None, n_ctx: int = 8192, n_threads: int | None = None, n_gpu_layers="auto",
          vram=None, cache_dir: Path | None = None, cache_size: int = 4 << 30, max_image_bytes: int = 16 << 20,
          cors_origins: list[str] | None = None, verbose: bool = False) -> None:
    """Load the model and serve until interrupted (SIGINT / SIGTERM)."""
    import uvicorn

    from ..manifest import Manifest
    from ..runtime.chat import VisionChat
    from .app import Settings, create_app, is_loopback
    from .engine import Engine
    from .store import StateStore

    api_key = api_key or os.environ.get("ACESTEP_GGUF_API_KEY") or None
    if not is_loopback(host) and not api_key:
        raise OptionError(f"--host {host}: serving beyond this machine needs --api-key (or ACESTEP_GGUF_API_KEY)")
    if not 1 <= port <= 65535:
        raise OptionError(f"--port {port}: a port from 1 to 65535")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    chat = VisionChat.load(folder, quant=quant, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, vram=vram,
                           verbose=verbose)
    manifest = Manifest.read(folder)
    used = [f for f in manifest.files if f.file in (chat.files.model.name, chat.files.mmproj.name)]
    model_id = hashlib.sha256(f"{[(f.file, f.sha256) for f in used]}:{n_ctx}".encode()).hexdigest()[:16]
    store = StateStore(cache_size, cache_dir, model_id)
    engine = Engine(chat, store, manifest.name)
    settings = Settings(host=host, api_key=api_key, cors_origins=cors_origins or [], max_image_bytes=max_image_bytes,
                        model_bytes=sum(f.bytes for f in used), model_digest=model_id,
                        details={"format": "gguf", "family": manifest.source.get("family", ""),
                                 "quantization_level": chat.quant, "parameter_size": ""})
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="info" if verbose else "warning",
                timeout_graceful_shutdown=5)
