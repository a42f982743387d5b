"""What a cache folder holds, and how one stored value is laid out.

``<cache_dir>/<tower>-<short encoder name>-<12-hex digest>/`` holds ``data.mdb`` (an LMDB store:
key = item token utf-8, value = the raw bytes of a contiguous ``[n_stored_layers, dim]`` array
in ``cache_dtype`` followed by a 4-byte checksum), ``manifest.json`` and, written last,
``COMPLETE``. The digest is that of the folder's identity (``identity.py``).

Each value ends with ``crc32(value, crc32(key, seed))`` (little-endian), the seed being a crc32 of
the folder's digest and the stored layers, so a value that was overwritten, moved to another key
or copied from another cache fails its check (``integrity.py``).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from recbole_iisan.utils.errors import CacheError

CACHE_DTYPES = ("float16", "bfloat16", "float32")
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
FORMAT_VERSION = 2  # 2: every value ends with a crc32 (see the module docstring)
DATA = "data.mdb"
CRC_BYTES = 4


# --------------------------------------------------------------------------------------------
# the folder

def read_manifest(cache_path: Path | str) -> dict[str, Any]:
    """The folder's ``manifest.json``; ``CacheError`` when it is absent or not JSON."""
    path = Path(cache_path) / MANIFEST
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{path} does not exist: not a cache folder (run build_cache)") from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise CacheError(f"{path} is not valid JSON ({exc}): delete the folder and rebuild") from None
    if not isinstance(man, dict):
        raise CacheError(f"{path} holds a JSON {type(man).__name__}, not the manifest's object: delete the "
                         f"folder and rebuild")
    return man


def is_complete(cache_path: Path | str) -> bool:
    """Whether a build finished the folder: ``COMPLETE`` written and the manifest says so."""
    p = Path(cache_path)
    if not (p / COMPLETE).is_file() or not (p / MANIFEST).is_file():
        return False
    try:
        return bool(read_manifest(p).get("complete"))
    except CacheError:
        return False


def folder_digest(folder: Path) -> str:
    """The 12-hex digest at the end of a cache folder's name."""
    return folder.name.rsplit("-", 1)[-1]


def open_env(folder: Path, map_size: int, readonly: bool = False) -> Any:
    """The folder's LMDB store (read-only: no lock, so many readers and read-only folders work).
    Check a complete store first (``integrity.check_complete_store``): LMDB maps the file, and a
    truncated one would end the process with SIGBUS."""
    import lmdb

    if readonly:
        return lmdb.open(str(folder), readonly=True, lock=False, readahead=False, subdir=True,
                         max_readers=512)
    return lmdb.open(str(folder), map_size=map_size, subdir=True, readahead=False, meminit=False,
                     max_dbs=0)


# --------------------------------------------------------------------------------------------
# one value: the states in the storage dtype, then their checksum

def np_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a ``cache_dtype`` is stored as (bfloat16 as its uint16 bits)."""
    return {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32),
            "bfloat16": np.dtype(np.uint16)}[dtype]


def to_bytes(states: torch.Tensor, dtype: str, source: str = "") -> np.ndarray:
    """float32 [B, L, D] -> numpy array in the storage dtype (bfloat16 as its uint16 bits).

    float16 ends at 65,504: larger states (decoder LLMs reach |h| ~ 2e4 and beyond) would be
    stored as inf and train on NaN, so they are refused in one line naming ``source``."""
    t = states.detach().to("cpu")
    if dtype == "float16" and t.numel():
        peak = float(t.abs().amax())
        if not peak <= 65504.0:
            raise CacheError(f"{source or 'the encoder'} has hidden states up to |h| = {peak:.4g}, beyond "
                             f"float16's 65504 (cache_dtype: float16); set --cache_dtype=bfloat16 (or float32)")
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).contiguous().numpy()


def crc_seed(digest: str, layers: Sequence[int]) -> int:
    """The start value of every value's crc32: ties the values to this folder and layer set."""
    return zlib.crc32(f"recbole_iisan cache {digest} layers {','.join(map(str, layers))}".encode())


def value_crc(key: bytes, payload: Any, seed: int) -> int:
    """The checksum stored after ``payload`` under ``key``."""
    return zlib.crc32(payload, zlib.crc32(key, seed))


def crc_ok(key: bytes, value: Any, seed: int) -> bool:
    """Whether a stored value (payload + checksum) passes its check."""
    n = len(value) - CRC_BYTES
    return value_crc(key, value[:n], seed) == int.from_bytes(value[n:], "little")


def put_batch(env: Any, keys: list[bytes], arr: np.ndarray, seed: int) -> None:
    """One transaction for one encoded batch (``arr[r]`` is the value of ``keys[r]``). Keys already
    stored (a concurrent build of the same folder wrote them) are left as they are, so a finished
    store does not change."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for r, key in enumerate(keys):
                    if txn.get(key) is not None:
                        continue
                    payload = arr[r].tobytes()
                    txn.put(key, payload + value_crc(key, payload, seed).to_bytes(CRC_BYTES, "little"))
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


__all__ = ["CACHE_DTYPES", "COMPLETE", "CRC_BYTES", "DATA", "FORMAT_VERSION", "MANIFEST", "crc_ok", "crc_seed",
           "folder_digest", "is_complete", "np_dtype", "open_env", "put_batch", "read_manifest", "to_bytes",
           "value_crc"]
