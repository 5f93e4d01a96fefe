"""`caption --ray`: the same captions as `caption`, from a pool of Ray actors, each holding one loaded
VisionChat. Ray is an optional extra (pip install acestep-gguf[ray]).

Exactly once, resumable: the driver alone writes the output file, one whole line per finished image
(a single write() on an O_APPEND descriptor), so a crash anywhere loses only the images in flight and
never duplicates or tears a record; a re-run skips every image that has a line (failed ones too,
unless retry_failed). A worker that dies is restarted by Ray and its task retried; an image is
resubmitted to another worker if that fails too. Images and the model are read by the workers from a
filesystem every node sees; the driver only sends paths. Before any image is captioned, every worker
checks that its model folder's manifest.json has the driver's sha256."""

from __future__ import annotations

import collections
import hashlib
import os
import time
from pathlib import Path
from typing import Callable

from ..errors import AcestepGGUFError, ModelFilesError, OptionError
from .kv_cache_types import CacheTypes
from ..files import read_bytes
from .caption import Appender, caption_records, pending

IN_FLIGHT_PER_WORKER = 2  # tasks (of --parallel images each): one running, one queued, so workers never wait


def manifest_sha256(folder: Path) -> str:
    return hashlib.sha256(read_bytes(Path(folder) / "manifest.json", ModelFilesError, 16 << 20, "manifest")).hexdigest()


class Captioner:
    """A Ray actor: one model, loaded once, checked against the driver's manifest first."""

    def __init__(self, folder: str, expected_sha256: str, quant: str | None, n_ctx: int, threads: int, gpu_layers,
                 cache_types: tuple[str, str] = ("f16", "f16"), parallel: int = 1):
        from .chat import VisionChat
        found = manifest_sha256(Path(folder))
        if found != expected_sha256:
            raise ModelFilesError(f"{folder} on worker {os.uname().nodename} (pid {os.getpid()}) holds another model: "
                                  f"manifest.json sha256 {found[:12]}… but the driver expects {expected_sha256[:12]}…")
        self.chat = VisionChat.load(folder, quant=quant, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers,
                                    cache_type_k=cache_types[0], cache_type_v=cache_types[1], parallel=parallel)

    def pid(self) -> int:
        return os.getpid()

    def parallel(self) -> int:
        return self.chat.parallel

    def caption(self, paths: list[str], prompt: str, max_tokens: int) -> list[dict]:
        """The records of a few images, decoded together (the worker's --parallel)."""
        return list(caption_records(self.chat, paths, prompt, max_tokens))


def caption_with_ray(folder: Path, files: list[Path], prompt: str, out_file: Path, *, address: str | None = None,
                     workers: int = 2, cpus_per_worker: int = 1, gpus_per_worker: float = 0, quant: str | None = None,
                     n_ctx: int = 4096, max_tokens: int = 256, retry_failed: bool = False,
                     expected_sha256: str | None = None,
                     on_progress: Callable[[dict], None] = lambda progress: None, cache_type_k: str = "f16",
                     cache_type_v: str = "f16", parallel: int | str = 1) -> dict:
    """Caption ``files`` on a Ray cluster (``address``: None for a local one started for the run, or
    what ray.init takes: "auto", "ray://host:10001", ...). Returns the summary."""
    try:
        import ray
        from ray.exceptions import RayActorError, RayTaskError
    except ImportError:
        raise OptionError("caption --ray needs Ray: pip install 'acestep-gguf[ray]'") from None
    if workers < 1 or cpus_per_worker < 1 or gpus_per_worker < 0:
        raise OptionError("--workers and --cpus-per-worker must be at least 1, --gpus-per-worker at least 0")
    if parallel != "auto" and (type(parallel) is not int or parallel < 1):
        raise OptionError(f"--parallel {parallel!r}: 'auto' or a whole number of at least 1")
    CacheTypes.parse(cache_type_k, cache_type_v)  # a bad type is one line here, not on every worker
    expected = expected_sha256 or manifest_sha256(folder)
    todo, skipped = pending(files, out_file, retry_failed)
    summary = {"captioned": 0, "skipped": skipped, "failed": 0, "total": len(files), "workers": workers,
               "seconds": 0.0}
    if not todo:
        return summary
    started_here = not ray.is_initialized()
    if started_here:
        if address is None:  # a local cluster for this run, on loopback only
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(num_cpus=workers * cpus_per_worker, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    sink = Appender(out_file)
    began = time.perf_counter()
    try:
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=3,
                           max_task_retries=3)(Captioner)
        gpu_layers = "auto" if gpus_per_worker else 0
        pool = [actor.remote(str(Path(folder).resolve()), expected, quant, n_ctx, cpus_per_worker, gpu_layers,
                             (cache_type_k, cache_type_v), parallel)
                for _ in range(workers)]
        try:  # every worker has the right model before a single image is captioned
            ray.get([a.pid.remote() for a in pool])
        except (RayActorError, RayTaskError) as e:
            raise ModelFilesError(_cause(e)) from None
        chunk = max(ray.get([a.parallel.remote() for a in pool]))  # images per task: what a worker decodes at once
        queue, running = collections.deque(str(p) for p in todo), {}
        attempts: dict[str, int] = {}
        while queue or running:
            for a in pool:
                while queue and sum(1 for _, w in running.values() if w is a) < IN_FLIGHT_PER_WORKER:
                    paths = [queue.popleft() for _ in range(min(chunk, len(queue)))]
                    running[a.caption.remote(paths, prompt, max_tokens)] = (paths, a)
            finished, _ = ray.wait(list(running), num_returns=1)
            ref = finished[0]
            paths, a = running.pop(ref)
            try:
                records = ray.get(ref)
            except (RayActorError, RayTaskError) as e:  # the worker died for good: another one takes the images
                attempts[paths[0]] = attempts.get(paths[0], 0) + 1
                if attempts[paths[0]] > 3 or len(pool) == 1:
                    raise AcestepGGUFError(f"{paths[0]}: no worker could caption it ({_cause(e)})") from None
                pool = [w for w in pool if w is not a] or pool
                queue.extendleft(reversed(paths))
                continue
            for record in records:
                summary["failed" if "error" in record else "captioned"] += 1
                sink.write(record)
                done = summary["captioned"] + summary["failed"]
                elapsed = time.perf_counter() - began
                on_progress({"done": done, "to_do": len(todo), "failed": summary["failed"], "record": record,
                             "images_per_s": done / elapsed if elapsed else 0.0,
                             "eta_s": (len(todo) - done) * elapsed / done if done else None})
    finally:
        sink.close()
        summary["seconds"] = round(time.perf_counter() - began, 2)
        if started_here:
            ray.shutdown()
    return summary


def _cause(error) -> str:
    """The first line of what went wrong on the worker, without Ray's wrapping."""
    cause = getattr(error, "cause", None) or getattr(error, "error_msg", None) or error
    text = str(cause).strip().splitlines()
    for line in reversed(text):
        if "Error: " in line:
            return line.split("Error: ", 1)[1].strip()
    return text[-1] if text else type(error).__name__
