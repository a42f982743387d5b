"""Where the cached item states live while a model trains: in memory, or memory-mapped from a file.

The LMDB cache (the other modules of ``data/cache/``) is the durable, resumable store keyed by item token. A model
reads the states as ONE tensor per tower, ``[n_items + 1, n_rows, dim]`` in RecBole's internal
item-id order (row 0 = the padding item, zeros), and gathers rows per batch (``states[ids]``).

``state_storage`` chooses how that tensor is held:

* ``memory``: a dense tensor in RAM, filled straight from LMDB (no second copy: the padded
  layout is allocated once and LMDB values are copied into its rows).
* ``mmap``: the padded tensor is exported once to ``<cache folder>/states-<digest>.npy`` (numpy
  ``.npy``, written to a temp file and renamed, so a killed export leaves nothing half-written),
  then opened as a ``numpy.memmap`` and wrapped as a torch tensor WITHOUT copying. Indexing it
  (``states[ids]``) reads only the pages of the gathered rows; the OS page cache keeps hot rows
  and drops cold ones under pressure, so a catalogue larger than RAM still trains. The mapping is
  copy-on-write (``mode='c'``): the file is never written after the export, so processes of a DDP
  run and trials of a search share it read-only.
* ``auto``: ``memory`` when the states of all towers take less than ``state_memory_fraction``
  of the machine's available memory (``MemAvailable`` of ``/proc/meminfo``), else ``mmap``.

The export is keyed by the cache folder, the tokens (in id order), the rows and the dtype, so a
changed item set or layer choice makes a new file, and an existing one is reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from recbole_iisan.data.cache.layout import read_manifest
from recbole_iisan.data.cache.load import load_states
from recbole_iisan.utils.errors import CacheError
from recbole_iisan.utils.files import atomic_write_json

logger = logging.getLogger("recbole_iisan.state_store")

STORAGES = ("memory", "mmap", "auto")
DEFAULT_MEMORY_FRACTION = 0.5
_NP_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.int16}  # bf16 kept as its bits


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _NP_DTYPES:
        raise CacheError(f"state dtype {dtype} is not one of {sorted(_NP_DTYPES)}")
    return name


def state_bytes(n_items: int, n_rows: int, dim: int, dtype: torch.dtype) -> int:
    """Bytes of one tower's padded state tensor ``[n_items + 1, n_rows, dim]``."""
    return (n_items + 1) * n_rows * dim * torch.empty((), dtype=dtype).element_size()


def available_memory_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux); total physical memory elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_storage(setting: str, total_bytes: int, fraction: float = DEFAULT_MEMORY_FRACTION,
                   available: Optional[int] = None) -> str:
    """``memory`` or ``mmap`` for ``state_storage: setting`` and states of ``total_bytes``."""
    setting = str(setting).lower()
    if setting not in STORAGES:
        raise CacheError(f"config key 'state_storage': expected one of {list(STORAGES)}, got {setting!r}")
    if setting != "auto":
        return setting
    available = available_memory_bytes() if available is None else available
    return "memory" if total_bytes < fraction * available else "mmap"


def _rows_to_layers(cache_path: Path, layers: Sequence[int]) -> tuple[dict, list[int]]:
    man = read_manifest(cache_path)
    stored = [int(x) for x in man["layers"]]
    absent = [x for x in layers if int(x) not in stored]
    if absent:
        raise CacheError(f"cache {cache_path} stores hidden states {stored}, asked for {list(layers)}: "
                         f"run build_cache with the model's settings")
    return man, stored


def _fill(target: np.ndarray, cache_path: Path, tokens: Sequence[str], layers: Sequence[int],
          chunk: int) -> list[int]:
    """Copy the states of ``tokens`` into ``target[1:]`` (numpy, any layout-compatible dtype),
    ``chunk`` tokens per LMDB read. Returns the positions (0-based in ``tokens``) with no state."""
    missing: list[int] = []
    dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
             np.dtype(np.int16): torch.bfloat16}[target.dtype]
    for start in range(0, len(tokens), chunk):
        part, miss = load_states(cache_path, tokens[start:start + chunk], layers, dtype=dtype)
        arr = part.view(torch.int16).numpy() if dtype == torch.bfloat16 else part.numpy()
        target[1 + start:1 + start + len(arr)] = arr
        missing.extend(start + m for m in miss)
    return missing


def load_dense(cache_path: Path | str, tokens: Sequence[str], layers: Sequence[int],
               dtype: torch.dtype = torch.float16, chunk: int = 65536) -> tuple[torch.Tensor, list[int]]:
    """``([len(tokens) + 1, n_rows, dim] tensor in RAM, row 0 zeros; missing positions)``.

    Peak memory is the padded tensor + one chunk (``load_states`` over all tokens + a padded
    copy, as ``MultimodalSequentialDataset`` does today, holds the states twice)."""
    cache_path = Path(cache_path)
    man, _ = _rows_to_layers(cache_path, layers)
    dim = int(man["dim"])
    out = torch.zeros((len(tokens) + 1, len(layers), dim), dtype=dtype)
    target = out.view(torch.int16).numpy() if dtype == torch.bfloat16 else out.numpy()
    missing = _fill(target, cache_path, [str(t) for t in tokens], layers, chunk)
    return out, missing


def export_key(cache_path: Path | str, tokens: Sequence[str], layers: Sequence[int], dtype: torch.dtype) -> str:
    """Digest of what an exported state file holds (cache folder identity, tokens, rows, dtype)."""
    man = read_manifest(cache_path)
    h = hashlib.sha256()
    h.update(json.dumps({"identity": man.get("identity"), "stored_layers": man.get("layers"),
                         "layers": [int(x) for x in layers], "dtype": _dtype_name(dtype)},
                        sort_keys=True).encode())
    for t in tokens:
        h.update(str(t).encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def state_file(cache_path: Path | str, tokens: Sequence[str], layers: Sequence[int],
               dtype: torch.dtype = torch.float16, folder: Optional[Path | str] = None) -> Path:
    """Where the export of these states lives (default: inside the cache folder)."""
    key = export_key(cache_path, tokens, layers, dtype)
    return Path(folder or cache_path) / f"states-{key}.npy"


def export_states(cache_path: Path | str, tokens: Sequence[str], layers: Sequence[int],
                  dtype: torch.dtype = torch.float16, folder: Optional[Path | str] = None,
                  chunk: int = 65536) -> tuple[Path, list[int]]:
    """Write the padded state tensor of ``tokens`` to a ``.npy`` file once (reused if present).

    Returns ``(path, missing positions)``; the missing positions are stored next to it
    (``<file>.json``) so a reuse reports them too. Written to a temp file, fsynced, renamed."""
    cache_path = Path(cache_path)
    tokens = [str(t) for t in tokens]
    path = state_file(cache_path, tokens, layers, dtype, folder)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return path, [int(x) for x in meta.get("missing", [])]
    man, _ = _rows_to_layers(cache_path, layers)
    dim = int(man["dim"])
    name = _dtype_name(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=_NP_DTYPES[name],
                                        shape=(len(tokens) + 1, len(layers), dim))
        arr[0] = 0
        missing = _fill(arr, cache_path, tokens, layers, chunk)
        arr.flush()
        del arr
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        atomic_write_json(meta_path, {"tokens": len(tokens), "layers": [int(x) for x in layers], "dtype": name,
                                      "dim": dim, "missing": missing, "cache": str(cache_path)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path, missing


def open_states(path: Path | str, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The ``.npy`` state file as a torch tensor backed by a copy-on-write memory map (no copy:
    rows are read from the page cache when indexed)."""
    arr = np.load(str(path), mmap_mode="c")
    if _NP_DTYPES[_dtype_name(dtype)] != arr.dtype.type:
        raise CacheError(f"{path} holds {arr.dtype}, expected {dtype}")
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def is_memory_mapped(t: torch.Tensor) -> bool:
    """Whether a state tensor is backed by a file map (not by anonymous memory)."""
    ptr = t.untyped_storage().data_ptr()
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            span, rest = line.split(" ", 1)
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= ptr < hi:
                return rest.rstrip().endswith(".npy")
    except OSError:
        pass
    return False


def load_item_states(cache_path: Path | str, tokens: Sequence[str], layers: Sequence[int],
                     dtype: torch.dtype = torch.float16, storage: str = "memory",
                     folder: Optional[Path | str] = None) -> tuple[torch.Tensor, list[int]]:
    """One tower's ``[len(tokens) + 1, n_rows, dim]`` states (row 0 zeros) held as ``storage``
    (``memory`` or ``mmap``; resolve ``auto`` with :func:`choose_storage` over all towers first).
    Returns ``(states, missing positions in tokens)``."""
    if storage == "memory":
        return load_dense(cache_path, tokens, layers, dtype)
    if storage != "mmap":
        raise CacheError(f"config key 'state_storage': expected memory or mmap here, got {storage!r}")
    path, missing = export_states(cache_path, tokens, layers, dtype, folder)
    return open_states(path, dtype), missing


__all__ = ["STORAGES", "available_memory_bytes", "choose_storage", "export_states", "is_memory_mapped",
           "load_dense", "load_item_states", "open_states", "state_bytes", "state_file"]
