"""The models one server answers for, and which of them are loaded.

Single-model mode (`serve -m FOLDER|NAME`): one model, loaded at start, never unloaded; any request
naming it (or "default") gets it. Store mode (`serve` with no -m): every model of the store, by
`name`, `name:TYPE` or `name:latest` (the default type); a model loads on first use and stays within
`--max-loaded` and a memory budget (file bytes + its KV cache, the planner's figures), least recently
used unloaded first, only when no request is using it; each request's Ollama `keep_alive` (else the
server's `--keep-alive`) says how long it stays after use, `0` unloading it at once. The catalog is
read from the store on each call, so `pull`, `import` and `rm` (CLI or HTTP) show at once. Each loaded
model has its own Engine, KV cache and saved states (a subfolder per model identity): requests for
different models never share conversation state."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import AcestepGGUFError
from ..model_store import ModelStore, parse_reference
from .limits import RequestError

log = logging.getLogger("acestep_gguf.server")
FOREVER = float("inf")
_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")


def keep_alive_seconds(value, where: str = "keep_alive") -> float:
    """Ollama's keep_alive: seconds as a number, or '30s' / '5m' / '1h'; negative is forever, 0 at once."""
    if isinstance(value, bool) or value is None:
        raise RequestError(400, f"{where} must be a duration such as 5m, 30s or 0", where)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            raise RequestError(400, f"{where} {str(value)[:30]!r} must be a duration such as 5m, 30s or 0", where)
        seconds = float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return FOREVER if seconds < 0 else seconds


@dataclass
class Entry:
    id: str  # "name:TYPE"
    name: str
    quant: str
    folder: Path
    engine: object | None = None
    users: int = 0
    loading: bool = False
    expires: float = FOREVER  # time.monotonic() after which an idle model is unloaded
    bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ModelPool:
    def __init__(self, load: Callable[[Path, str | None], object], *, store: ModelStore | None = None,
                 fixed: tuple[str, Path, str] | None = None, max_loaded: int = 1, max_bytes: int = 1 << 62,
                 keep_alive: float = 300.0, memory_of: Callable[[Path, str], int] = lambda folder, quant: 0):
        """``fixed`` = (name, folder, quant) for single-model mode, else every model of ``store``."""
        self.load_fn, self.store, self.memory_of = load, store, memory_of
        self.max_loaded, self.max_bytes, self.keep_alive = max_loaded, max_bytes, keep_alive
        self.fixed = fixed
        self._catalog: tuple | None = None  # (the store's stamp, rows): re-read only when the store changes
        self.entries: dict[str, Entry] = {}
        self._cond: asyncio.Condition | None = None
        self.closing = False

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    # -- what can be served ---------------------------------------------------------------------------
    def catalog(self) -> list[tuple[str, str, Path, str]]:
        """(id, name, folder, type) of every model this server can serve, default type first per name."""
        if self.fixed is not None:
            name, folder, quant = self.fixed
            return [(f"{name}:{quant}", name, folder, quant)]
        stamp = self.store.stamp()
        if self._catalog is not None and self._catalog[0] == stamp and stamp is not None:
            return self._catalog[1]
        out = []
        for model in self.store.list():
            types = model.types()
            default = model.manifest.pick("language", None).type
            for t in [default] + [t for t in types if t != default]:
                out.append((f"{model.name}:{t}", model.name, model.folder, t))
        self._catalog = (stamp, out)
        return out

    def lookup(self, reference) -> tuple[str, str, Path, str]:
        """The catalog row a request's `model` names; 404 in the caller's shape when none."""
        if not isinstance(reference, str) or not reference:
            raise RequestError(404, f"model {str(reference)[:80]!r} not found", "model", "model_not_found")
        rows = self.catalog()
        if self.fixed is not None:
            name = self.fixed[0]
            if reference in (name, "default") or reference.partition(":")[0] in (name, "default"):
                return rows[0]
        else:
            try:
                name, quant = parse_reference(reference)
            except AcestepGGUFError:
                name, quant = None, None
            for row in rows:
                if row[1] == name and (quant is None or row[3] == quant):
                    return row
        served = ", ".join(r[0] for r in rows) or "none"
        raise RequestError(404, f"model '{reference[:80]}' not found (this server serves: {served})", "model",
                           "model_not_found")

    # -- using one ------------------------------------------------------------------------------------
    @asynccontextmanager
    async def use(self, reference, keep_alive=None):
        """The Engine of the model a request names, loaded if need be, held until the block ends."""
        model_id, name, folder, quant = self.lookup(reference)
        seconds = self.keep_alive if keep_alive is None else keep_alive_seconds(keep_alive)
        entry = await self._acquire(model_id, name, folder, quant)
        try:
            yield entry.engine
        finally:
            async with self.cond:
                entry.users -= 1
                entry.last_used = time.monotonic()
                entry.expires = FOREVER if self.fixed else entry.last_used + seconds
                self.cond.notify_all()
            if seconds == 0 and not self.fixed:
                await self.reap()

    async def _acquire(self, model_id, name, folder, quant) -> Entry:
        async with self.cond:
            while True:
                if self.closing:
                    raise RequestError(503, "the server is shutting down", None, "shutting_down")
                entry = self.entries.get(model_id)
                if entry is not None and entry.engine is not None:
                    entry.users += 1
                    return entry
                if entry is None or not entry.loading:
                    need = self.memory_of(folder, quant)
                    victims = self._room_for(need)
                    if victims is not None:
                        entry = self.entries.setdefault(model_id, Entry(model_id, name, quant, folder))
                        entry.loading, entry.bytes = True, need
                        break
                await self.cond.wait()
        for victim in victims:
            await self._unload(victim)
        try:
            engine = await asyncio.to_thread(self.load_fn, folder, quant)
        except BaseException:
            async with self.cond:
                self.entries.pop(model_id, None)
                self.cond.notify_all()
            raise
        async with self.cond:
            entry.engine, entry.loading, entry.users = engine, False, entry.users + 1
            self.cond.notify_all()
        log.info("loaded %s", model_id)
        return entry

    def _room_for(self, need: int) -> list[Entry] | None:
        """Idle loaded models to unload (least recently used first) so one more of ``need`` bytes fits;
        None while it cannot fit yet (models in use must finish first)."""
        loaded = [e for e in self.entries.values() if e.engine is not None or e.loading]
        idle = sorted((e for e in loaded if e.users == 0 and not e.loading and not self.fixed), key=lambda e: e.last_used)
        count, used, victims = len(loaded), sum(e.bytes for e in loaded), []
        while count + 1 > self.max_loaded or (used + need > self.max_bytes and count):
            if not idle:
                return None
            victim = idle.pop(0)
            victims.append(victim)
            count, used = count - 1, used - victim.bytes
        for victim in victims:
            victim.loading = True  # being unloaded: nobody takes it meanwhile
        return victims

    async def _unload(self, entry: Entry) -> None:
        engine = entry.engine
        async with self.cond:
            self.entries.pop(entry.id, None)
            self.cond.notify_all()
        if engine is not None:
            await asyncio.to_thread(engine.close)  # keeps its conversation on disk, frees llama.cpp's memory
            log.info("unloaded %s", entry.id)

    async def reap(self) -> None:
        """Unload idle models whose keep-alive has run out."""
        now = time.monotonic()
        async with self.cond:
            due = [e for e in self.entries.values() if e.engine is not None and e.users == 0 and not e.loading
                   and e.expires <= now]
            for e in due:
                e.loading = True
        for e in due:
            await self._unload(e)

    async def unload(self, model_id: str) -> bool:
        """Unload one model now (Ollama's delete); False if a request is using it."""
        async with self.cond:
            entry = self.entries.get(model_id)
            if entry is None or entry.engine is None:
                return True
            if entry.users or entry.loading:
                return False
            entry.loading = True
        await self._unload(entry)
        return True

    def pin(self, engine, n_bytes: int) -> None:
        """Single-model mode: the model loaded at start, held for the server's life."""
        model_id, name, folder, quant = self.catalog()[0]
        self.entries[model_id] = Entry(model_id, name, quant, folder, engine=engine, bytes=n_bytes)

    def loaded(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.engine is not None]

    def shutdown(self) -> None:
        """A stop signal: no new requests, running generations cancelled (safe from a signal handler)."""
        self.closing = True
        for e in list(self.entries.values()):
            if e.engine is not None:
                e.engine.shutdown()

    def close(self) -> None:
        for e in list(self.entries.values()):
            if e.engine is not None:
                e.engine.close()
        self.entries.clear()
