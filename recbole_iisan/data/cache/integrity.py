"""Checks that a cache folder holds what its name and its manifest say, before anything is trusted.

On completion the manifest records the size of ``data.mdb``, its number of entries and the value
size. Before LMDB opens a store (where a truncated file would end the process with SIGBUS) the
file size is checked against the manifest and against LMDB's own header, and the manifest against
the folder's digest. Reusing a cache (``ensure_cache``) verifies every value (``verify_cache``);
``load_states`` verifies the values it reads. A damaged cache raises ``CacheDamagedError``, one
line naming the folder.
"""
from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from recbole_iisan.data.cache.identity import digest
from recbole_iisan.data.cache.layout import (CACHE_DTYPES, COMPLETE, CRC_BYTES, DATA, MANIFEST, crc_ok,
                                             crc_seed, folder_digest, is_complete, np_dtype, open_env,
                                             read_manifest)
from recbole_iisan.utils.errors import CacheDamagedError, CacheError

_PAGE_SIZES = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def damaged(folder: Path, what: str) -> CacheDamagedError:
    """The error for a damaged cache: ``cache <folder> is damaged (<what>)``."""
    return CacheDamagedError(f"cache {folder} is damaged ({what})")


def require_complete(folder: Path) -> dict[str, Any]:
    """The manifest of a folder a build finished; ``CacheError`` when it is not one."""
    man = read_manifest(folder)
    if not is_complete(folder):
        raise CacheError(f"cache {folder} is incomplete (no {COMPLETE} marker): run "
                         f"python -m recbole_iisan.build_cache to finish it")
    return man


def _meta_pages(folder: Path) -> tuple[int, int, bytes, bytes]:
    """``(file size, page size, first meta page, second meta page)`` of ``data.mdb``."""
    path = folder / DATA
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4096)
            psize = struct.unpack_from("<I", head, 40)[0] if len(head) >= 48 else 0
            if psize in _PAGE_SIZES and psize != 4096:
                f.seek(0)
                head = f.read(psize)
            f.seek(psize)
            second = f.read(psize)
    except FileNotFoundError:
        raise damaged(folder, f"no {DATA}") from None
    except OSError as exc:
        raise damaged(folder, f"{DATA} cannot be read: {exc}") from None
    if size < 2 * max(psize, 4096) or len(second) < 152:
        raise damaged(folder, f"{DATA} has {size} bytes, less than LMDB's two header pages")
    return size, psize, head, second


def lmdb_header(folder: Path) -> dict[str, int]:
    """Size, page size, last page and entry count of ``data.mdb`` read from its two meta pages
    (LMDB's on-disk format, 64-bit), checked so that opening it cannot read past the end of the
    file (a truncated file would otherwise end the process with SIGBUS)."""
    size, psize, head, second = _meta_pages(folder)
    metas = []
    for raw in (head, second):
        flags = struct.unpack_from("<H", raw, 10)[0]
        magic, version = struct.unpack_from("<II", raw, 16)
        if not flags & 0x08 or magic != 0xBEEFC0DE or version != 1:
            raise damaged(folder, f"{DATA} has no valid LMDB header")
        entries = struct.unpack_from("<Q", raw, 120)[0]
        last_pg, txnid = struct.unpack_from("<QQ", raw, 136)
        metas.append((txnid, last_pg, entries))
    txnid, last_pg, entries = max(metas)
    need = (last_pg + 1) * psize
    if size < need:
        raise damaged(folder, f"{DATA} has {size} bytes, its LMDB header needs {need}: truncated "
                              f"(a partial copy or a full disk)")
    return {"size": size, "psize": psize, "last_pg": last_pg, "entries": entries, "txnid": txnid}


def _check_layers(folder: Path, man: Mapping[str, Any], n_layers: int) -> list[int]:
    layers = man.get("layers")
    if (not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers)
            or layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] <= n_layers):
        raise damaged(folder, f"{MANIFEST} key 'layers' is {layers!r}, expected sorted hidden-state "
                              f"indices in 0..{n_layers}")
    return layers


def _check_store_record(folder: Path, man: Mapping[str, Any], value_bytes: int) -> None:
    store = man.get("store")
    if not isinstance(store, dict):
        raise damaged(folder, f"{MANIFEST} has no 'store' record")
    if store.get("value_bytes") != value_bytes:
        raise damaged(folder, f"{MANIFEST} records values of {store.get('value_bytes')} bytes, "
                              f"its layers, dim and dtype give {value_bytes}")
    if store.get("entries") != man.get("item_count"):
        raise damaged(folder, f"{MANIFEST} records {store.get('entries')} entries and "
                              f"{man.get('item_count')} items")


def check_manifest(folder: Path, man: Mapping[str, Any]) -> tuple[int, int]:
    """Everything the manifest says about the stored values agrees with itself and with the
    folder's name; returns ``(value bytes, crc seed)``."""
    ident = man.get("identity")
    if not isinstance(ident, dict):
        raise damaged(folder, f"{MANIFEST} has no identity")
    if digest(ident) != folder_digest(folder):
        raise damaged(folder, f"the identity in {MANIFEST} has digest {digest(ident)}, "
                              f"the folder name says {folder_digest(folder)}")
    for key in ("weights_fingerprint", "model_type", "n_layers", "dim", "pooling", "dataset_fingerprint",
                "dtype", "encoder_dtype", "max_length", "fields"):
        if key in ident and man.get(key) != ident[key]:
            raise damaged(folder, f"{MANIFEST} key '{key}' is {man.get(key)!r}, its identity says {ident[key]!r}")
    layers = _check_layers(folder, man, int(ident.get("n_layers", -1)))
    if ident.get("dtype") not in CACHE_DTYPES:
        raise damaged(folder, f"{MANIFEST} has dtype {ident.get('dtype')!r}")
    value_bytes = len(layers) * int(ident["dim"]) * np_dtype(ident["dtype"]).itemsize + CRC_BYTES
    if man.get("complete"):
        _check_store_record(folder, man, value_bytes)
    return value_bytes, crc_seed(folder_digest(folder), layers)


def check_complete_store(folder: Path, man: Mapping[str, Any]) -> tuple[int, int]:
    """All checks that need no LMDB: manifest, file size and LMDB header against the manifest.
    Run before every ``lmdb.open`` of a complete cache. Returns ``(value bytes, crc seed)``."""
    value_bytes, seed = check_manifest(folder, man)
    head = lmdb_header(folder)
    store = man["store"]
    if head["size"] != store.get("data_bytes"):
        raise damaged(folder, f"{DATA} has {head['size']} bytes, {store.get('data_bytes')} when it was "
                              f"completed (a partial copy, a full disk or another file)")
    if head["entries"] != store["entries"]:
        raise damaged(folder, f"{DATA} holds {head['entries']} entries, {store['entries']} when it was completed")
    return value_bytes, seed


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Any]:
    """The checked store of a complete cache, opened read-only; LMDB's own errors (in opening or
    reading) become ``CacheDamagedError``."""
    import lmdb

    try:
        env = open_env(folder, 0, readonly=True)
        try:
            yield env
        finally:
            env.close()
    except lmdb.Error as exc:
        raise damaged(folder, f"LMDB: {' '.join(str(exc).split())}") from None


def scan(env: Any, value_bytes: int, seed: int, keep: Callable[[bytes], bool] | None = None
         ) -> tuple[list[bytes], list[bytes]]:
    """Check every record of an open store: ``(good keys, bad keys)``; a key is bad when its
    value has the wrong size or checksum or ``keep(key)`` is false."""
    good: list[bytes] = []
    bad: list[bytes] = []
    with env.begin(buffers=True) as txn:
        for key, val in txn.cursor():
            k = bytes(key)
            ok = len(val) == value_bytes and (keep is None or keep(k)) and crc_ok(k, val, seed)
            (good if ok else bad).append(k)
    return good, bad


def verify_cache(cache_path: Path | str) -> dict[str, Any]:
    """Check a complete cache in full: the manifest, ``data.mdb``'s size and header (before LMDB
    opens it), the number of entries and every value's size and checksum. Returns the manifest;
    raises ``CacheError`` (one line naming the folder) otherwise."""
    folder = Path(cache_path)
    man = require_complete(folder)
    value_bytes, seed = check_complete_store(folder, man)
    with read_only(folder) as env:
        good, bad = scan(env, value_bytes, seed)
    if bad:
        raise damaged(folder, f"{len(bad)} stored values fail their checksum, first item "
                              f"{bad[0].decode('utf-8', 'replace')!r}")
    if len(good) != man["item_count"]:
        raise damaged(folder, f"{len(good)} values stored, {man['item_count']} recorded")
    return man


__all__ = ["check_complete_store", "check_manifest", "damaged", "lmdb_header", "read_only", "require_complete",
           "scan", "verify_cache"]
