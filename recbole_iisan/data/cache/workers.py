"""Who encodes the batches of a build: this process, local worker processes, or Ray actors.

Parallel builds (``cache_shards: N``): the same global batches are encoded by N worker processes
(spawned locally, or Ray actors when ``ray_address`` is set, one GPU each where the cluster has
GPUs) and committed by the calling process, one transaction per batch; every batch is padded
exactly as in a one-process build, so the stored keys and values are identical, and a build
killed at any point (a worker or the caller) resumes from what was committed, with any N.

Every runner has ``run(payloads)``, which yields ``(k, states of payloads[k])`` in any order, and
``close()``; a worker that dies raises ``WorkerDied``.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from recbole_iisan.data.cache.layout import to_bytes
from recbole_iisan.towers import encoders as _enc
from recbole_iisan.towers.spec import TowerSpec


class WorkerDied(Exception):
    """An encoder worker process or actor ended before its batch was done."""


def encode_payload(encoder: Any, payload: list, layers: list[int], dtype: str, store: Any,
                   pixels: torch.Tensor | None = None) -> np.ndarray:
    """One batch (token ids of texts, or item tokens of an image tower, whose ``pixels`` may be
    preprocessed already) -> states in the storage dtype."""
    if encoder.is_image:
        if pixels is None:
            pixels = encoder.preprocess_bytes(store.get_bytes_many(payload))
        states = encoder.encode_pixels(pixels, layers)
    else:
        states = encoder.encode_ids(payload, layers)
    return to_bytes(states, dtype, f"tower '{encoder.tower}': encoder '{encoder.name}'")


def start_runner(spec: TowerSpec, device: str, encoder_dtype: str, layers: list[int], dtype: str, store: Any,
                 workers: int, ray_address: Any) -> Any:
    """``workers`` (> 1) encoders: Ray actors when ``ray_address`` is set, else local processes."""
    if ray_address:
        return RayRunner(spec, device, encoder_dtype, layers, dtype, store, workers, str(ray_address))
    return LocalRunner(spec, device, encoder_dtype, layers, dtype, store, workers)


# --------------------------------------------------------------------------------------------
# this process

class Prefetcher:
    """Reads and preprocesses the next image batch in a thread while the model runs."""

    def __init__(self, encoder: Any, store: Any, batches: list[list[str]]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.encoder, self.store, self.batches = encoder, store, batches
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.futures: dict[int, Any] = {}
        self._submit(0)

    def _load(self, k: int) -> torch.Tensor:
        return self.encoder.preprocess_bytes(self.store.get_bytes_many(self.batches[k]))

    def _submit(self, k: int) -> None:
        if k < len(self.batches) and k not in self.futures:
            self.futures[k] = self.pool.submit(self._load, k)

    def get(self, k: int) -> torch.Tensor:
        self._submit(k)
        self._submit(k + 1)
        return self.futures.pop(k).result()

    def close(self) -> None:
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True)


class InProcess:
    """The one-shard case: this process encodes (image batches prefetched in a thread)."""

    def __init__(self, encoder: Any, layers: list[int], dtype: str, store: Any, payloads: list) -> None:
        self.encoder, self.layers, self.dtype, self.store = encoder, layers, dtype, store
        self.prefetch = Prefetcher(encoder, store, payloads) if encoder.is_image else None

    def run(self, payloads: list) -> Any:
        for k, payload in enumerate(payloads):
            pixels = self.prefetch.get(k) if self.prefetch is not None else None
            yield k, encode_payload(self.encoder, payload, self.layers, self.dtype, self.store, pixels)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()


# --------------------------------------------------------------------------------------------
# inside a worker (a local process or a Ray actor)

_WORKER: dict[str, Any] = {}


def _worker_threads(workers: int) -> int:
    """Torch threads per worker: OMP_NUM_THREADS when set, else this process's share."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, torch.get_num_threads() // workers)


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _exit_with_caller(caller: int) -> None:
    """A worker whose caller died (SIGKILL leaves it no time to stop its workers) ends too."""
    import threading

    def watch() -> None:
        while _process_alive(caller):
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-caller", daemon=True).start()


def _worker_init(spec: TowerSpec, devices: Any, encoder_dtype: str, threads: int, layers: list[int],
                 dtype: str, store: Any, caller: int | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if caller is not None:
        _exit_with_caller(caller)
    torch.set_num_threads(threads)
    device = devices.get() if hasattr(devices, "get") else devices
    _WORKER.update(encoder=_enc.load_frozen_encoder(spec, device, encoder_dtype), layers=layers,
                   dtype=dtype, store=store)


def _worker_encode(k: int, payload: list) -> tuple[int, np.ndarray]:
    w = _WORKER
    return k, encode_payload(w["encoder"], payload, w["layers"], w["dtype"], w["store"])


# --------------------------------------------------------------------------------------------
# local worker processes

def _cuda_devices(device: str, workers: int) -> list[str]:
    """One device per worker: the GPUs in turn when ``device`` is cuda, else ``device``."""
    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{s % torch.cuda.device_count()}" for s in range(workers)]
    return [str(device)] * workers


def _died(exc: BaseException) -> WorkerDied:
    return WorkerDied(" ".join(str(exc).split()) or "a worker process ended")


class LocalRunner:
    """``workers`` local processes, each holding the encoder; batches are handed out in the
    global order, at most two in flight per worker; results come back in any order. (Started
    with forkserver or spawn: a script that builds caches needs ``if __name__ == "__main__":``.)"""

    def __init__(self, spec: TowerSpec, device: str, encoder_dtype: str, layers: list[int], dtype: str,
                 store: Any, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # forkserver: one server process imports the package once and forks the workers (no
        # re-import per worker; no fork of a process whose OpenMP threads already run)
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
        else:
            ctx = multiprocessing.get_context("spawn")
        self.devices = ctx.Queue()
        for d in _cuda_devices(device, workers):
            self.devices.put(d)
        self.workers, self.threads = workers, _worker_threads(workers)
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                        initargs=(spec, self.devices, encoder_dtype, self.threads, layers,
                                                  dtype, store, os.getpid()))

    def describe(self) -> str:
        return f"{self.workers} local worker processes ({self.threads} torch threads each)"

    def run(self, payloads: list) -> Any:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        pending: dict[Any, int] = {}
        nxt = 0
        while nxt < len(payloads) or pending:
            while nxt < len(payloads) and len(pending) < 2 * self.workers:
                try:
                    pending[self.pool.submit(_worker_encode, nxt, payloads[nxt])] = nxt
                except BrokenProcessPool as exc:
                    raise _died(exc) from None
                nxt += 1
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for f in sorted(finished, key=pending.__getitem__):
                del pending[f]
                try:
                    yield f.result()
                except BrokenProcessPool as exc:
                    raise _died(exc) from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.devices.close()


# --------------------------------------------------------------------------------------------
# Ray actors

class _RayEncoder:
    """A Ray actor holding one encoder (one GPU when the cluster has GPUs)."""

    def __init__(self, spec: TowerSpec, device: str, encoder_dtype: str, threads: int, layers: list[int],
                 dtype: str, store: Any) -> None:
        _worker_init(spec, device, encoder_dtype, threads, layers, dtype, store)

    def encode(self, k: int, payload: list) -> tuple[int, np.ndarray]:
        return _worker_encode(k, payload)


class RayRunner:
    """``workers`` Ray actors on the cluster at ``address`` (``local``: a new local instance);
    one GPU per actor where the cluster has GPUs, else one CPU. Ray restarts an actor that dies
    once and retries its calls."""

    def __init__(self, spec: TowerSpec, device: str, encoder_dtype: str, layers: list[int], dtype: str,
                 store: Any, workers: int, address: str) -> None:
        import ray

        self.ray, self.started = ray, False
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, log_to_driver=False, logging_level="warning")
            if address == "local":
                ray.init(num_cpus=max(workers, 1), **kw)
            else:
                ray.init(address=address, **kw)
            self.started = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus >= 1:
            workers, opts, device, threads = min(workers, gpus), {"num_gpus": 1, "num_cpus": 1}, "cuda", 1
        else:
            opts, device, threads = {"num_cpus": 1}, "cpu", _worker_threads(workers)
        self.kind = f"{workers} Ray actors ({'1 GPU' if gpus >= 1 else '1 CPU'} each)"
        actor = ray.remote(_RayEncoder).options(max_restarts=1, max_task_retries=1, **opts)
        self.actors = [actor.remote(spec, device, encoder_dtype, threads, layers, dtype, store)
                       for _ in range(workers)]

    def describe(self) -> str:
        return self.kind

    def run(self, payloads: list) -> Any:
        ray = self.ray
        pending: dict[Any, Any] = {}
        load = {i: 0 for i in range(len(self.actors))}
        nxt = 0
        while nxt < len(payloads) or pending:
            for i in sorted(load, key=load.__getitem__):
                if nxt < len(payloads) and load[i] < 2:
                    pending[self.actors[i].encode.remote(nxt, payloads[nxt])] = i
                    load[i] += 1
                    nxt += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                load[pending.pop(ref)] -= 1
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise WorkerDied(" ".join(str(exc).split())[:300]) from None

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()


__all__ = ["InProcess", "LocalRunner", "Prefetcher", "RayRunner", "WorkerDied", "encode_payload", "start_runner"]
