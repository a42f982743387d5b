"""Reading a complete cache: the rows of chosen items and hidden states as one tensor."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from recbole_iisan.data.cache.integrity import check_complete_store, damaged, read_only, require_complete
from recbole_iisan.data.cache.layout import crc_ok
from recbole_iisan.utils.errors import CacheDamagedError, CacheError

_REBUILD = "rebuild it with python -m recbole_iisan.build_cache (cache_rebuild: auto) or delete the folder"


def _refused(exc: CacheDamagedError) -> CacheDamagedError:
    """A damaged cache met while loading: the error says how to rebuild it."""
    return CacheDamagedError(f"{exc}: {_REBUILD}")


def _rows(folder: Path, man: Mapping[str, Any], layers: Sequence[int]) -> tuple[int, list[int]]:
    """``(number of stored layers, the stored row of each asked-for layer)``."""
    stored = [int(x) for x in man["layers"]]
    layers = [int(x) for x in layers]
    absent = [x for x in layers if x not in stored]
    if absent:
        raise CacheError(f"cache {folder} stores hidden states {stored}, asked for {layers}: "
                         f"run build_cache with the model's settings")
    return len(stored), [stored.index(x) for x in layers]


def _copy_values(txn: Any, folder: Path, target: np.ndarray, tokens: Sequence[str], n_stored: int,
                 rows: list[int], value_bytes: int, seed: int, verify: bool) -> list[int]:
    """Copy the asked-for rows of each token's value into ``target[pos]`` (a numpy view in the
    storage dtype); returns the positions of absent tokens."""
    np_dt, dim = target.dtype, target.shape[-1]
    whole = rows == list(range(n_stored))
    contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
    missing: list[int] = []
    for pos, tok in enumerate(tokens):
        key = str(tok).encode("utf-8")
        buf = txn.get(key)
        if buf is None:
            missing.append(pos)
            continue
        if len(buf) != value_bytes:
            raise _refused(damaged(folder, f"the value of item {tok!r} has {len(buf)} bytes, expected {value_bytes}"))
        if verify and not crc_ok(key, buf, seed):
            raise _refused(damaged(folder, f"the value of item {tok!r} fails its checksum"))
        arr = np.frombuffer(buf, dtype=np_dt, count=n_stored * dim).reshape(n_stored, dim)
        if whole:
            target[pos] = arr
        elif contiguous:
            target[pos] = arr[rows[0]:rows[0] + len(rows)]
        else:
            target[pos] = arr[rows]
    return missing


def load_states(cache_path: Path | str, tokens: Sequence[str], layers: Sequence[int],
                dtype: torch.dtype = torch.float16, *, verify: bool = True) -> tuple[torch.Tensor, list[int]]:
    """``(states [len(tokens), len(layers), dim], missing positions)`` from a complete cache.

    One preallocated tensor, one read transaction; rows of absent tokens are zeros. The manifest,
    the size of ``data.mdb`` and its LMDB header are checked before LMDB opens it; ``verify``
    also checks each value read against its checksum. A damaged cache raises ``CacheError``.
    """
    folder = Path(cache_path)
    man = require_complete(folder)
    try:
        value_bytes, seed = check_complete_store(folder, man)
    except CacheDamagedError as exc:
        raise _refused(exc) from None
    n_stored, rows = _rows(folder, man, layers)
    store_dtype = str(man["dtype"])
    out = torch.zeros((len(tokens), len(rows), int(man["dim"])), dtype=getattr(torch, store_dtype))
    target = out.view(torch.int16).numpy().view(np.uint16) if store_dtype == "bfloat16" else out.numpy()
    with read_only(folder) as env, env.begin(buffers=True) as txn:
        missing = _copy_values(txn, folder, target, tokens, n_stored, rows, value_bytes, seed, verify)
    if out.dtype != dtype:
        out = out.to(dtype)
    return out, missing


__all__ = ["load_states"]
