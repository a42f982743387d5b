"""The hidden-state cache: each frozen encoder runs once over every item of the dataset's ``.item``
file; the pooled states of the hidden states the model reads are kept in an LMDB store.

Layout: ``<cache_dir>/<tower>-<short encoder name>-<12-hex digest>/`` holding ``data.mdb`` (key =
item token utf-8, value = the raw bytes of a contiguous ``[n_stored_layers, dim]`` array in
``cache_dtype`` followed by a 4-byte checksum), ``manifest.json`` and, written last, ``COMPLETE``.

The digest covers everything that changes the stored values except the set of layers: weights
fingerprint, pooling, max length, fields, the items and their texts (or image digests), dtypes.
A folder whose stored layers cover the request is reused (only the asked-for rows are read); one
that does not is rebuilt with the union of both layer sets (``cache_rebuild: auto``) or refused
(``cache_rebuild: never``). Builds commit one LMDB transaction per encoder batch, over fixed
batches of the length-sorted item list, so a killed build resumes where it stopped and ends
bitwise equal to an uninterrupted one.

Integrity. Each value ends with ``crc32(value, crc32(key, seed))`` (little-endian), the seed
being a crc32 of the folder's digest and the stored layers, so a value that was overwritten, moved
to another key or copied from another cache fails its check. On completion the manifest records
the size of ``data.mdb``, its number of entries and the value size. Before LMDB opens a store
(where a truncated file would end the process with SIGBUS) the file size is checked against the
manifest and against LMDB's own header, and the manifest against the folder's digest. Reusing a
cache (``ensure_cache``) verifies every value; ``load_states`` verifies the values it reads. A
damaged cache is rebuilt under ``cache_rebuild: auto`` (the log says why) and refused with one
line naming the folder under ``never`` and in ``load_states``.

Parallel builds (``cache_shards: N``): the same global batches are encoded by N worker processes
(spawned locally, or Ray actors when ``ray_address`` is set, one GPU each where the cluster has
GPUs) and committed by the calling process, one transaction per batch; every batch is padded
exactly as in a one-process build, so the stored keys and values are identical, and a build
killed at any point (a worker or the caller) resumes from what was committed, with any N.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from recbole_iisan.towers import encoders as _enc
from recbole_iisan.towers import image_transform as _imgtf
from recbole_iisan.utils.files import atomic_write_json, atomic_write_text
from recbole_iisan.towers.spec import TowerSpec, tower_specs
from recbole_iisan.towers.layer_select import tower_layers_from_config
from recbole_iisan.utils.files import config_get as _get

logger = logging.getLogger("recbole_iisan.cache")

CACHE_DTYPES = ("float16", "bfloat16", "float32")
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
FORMAT_VERSION = 2  # 2: every value ends with a crc32 (see the module docstring)
DATA = "data.mdb"
CRC_BYTES = 4


from recbole_iisan.utils.errors import CacheDamagedError, CacheError  # noqa: F401  (re-exported)


# --------------------------------------------------------------------------------------------
# where

def dataset_dir(config: Mapping) -> Path:
    """The dataset's folder. RecBole's Config already appends the dataset name to ``data_path``;
    a plain dict (build_cache) does not: both work."""
    dataset = str(_get(config, "dataset", ""))
    if not dataset:
        raise CacheError("config key 'dataset' is not set")
    base = Path(os.path.expanduser(str(_get(config, "data_path", "dataset/"))))
    candidates = [base, base / dataset] if base.name == dataset else [base / dataset, base]
    for c in candidates:
        if (c / f"{dataset}.item").is_file():
            return c
    return candidates[0]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
        return True
    except OSError:
        return False


def cache_root(config: Mapping) -> Path:
    """``cache_dir`` if set (must be writable), else ``<data_path>/<dataset>/cache``, else (not
    writable, e.g. RecBole's bundled ml-100k) ``$XDG_CACHE_HOME/recbole_iisan/<dataset>``."""
    explicit = _get(config, "cache_dir")
    if explicit:
        root = Path(os.path.expanduser(str(explicit)))
        if str(_get(config, "cache_rebuild", "auto")) == "never" and root.is_dir():
            return root  # read-only use (tuning trials, a shared cluster folder): nothing is written
        if not _writable(root):
            raise CacheError(f"config key 'cache_dir': {root} is not a writable folder; "
                             f"choose another or leave cache_dir unset")
        return root
    default = dataset_dir(config) / "cache"
    # never write into an installed package (RecBole's bundled ml-100k lives in site-packages)
    from recbole_iisan.data.images import in_installed_package, user_data_dir

    in_package = in_installed_package(default)
    if not in_package and _writable(default):
        logger.info(f"cache folder: {default}")
        return default
    fallback = user_data_dir(str(_get(config, "dataset", "dataset")))
    if not _writable(fallback):
        raise CacheError(f"neither {default} nor {fallback} is writable: set config key 'cache_dir'")
    why = "inside an installed package" if in_package else "not writable"
    logger.info(f"cache folder: {fallback} ({default} is {why})")
    return fallback


# --------------------------------------------------------------------------------------------
# what

def read_item_file(config: Mapping) -> tuple[list[str], dict[str, list[str]]]:
    """``(field names, {field: values})`` of ``<dataset>.item`` (all strings, file order)."""
    path = dataset_dir(config) / f"{_get(config, 'dataset')}.item"
    if not path.is_file():
        raise CacheError(f"no item file {path}: run prepare for dataset '{_get(config, 'dataset')}' "
                         f"or set data_path")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise CacheError(f"{path} is empty")
    names = [h.split(":")[0] for h in rows[0]]
    cols: dict[str, list[str]] = {n: [] for n in names}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < len(names):
            row = row + [""] * (len(names) - len(row))
        for n, v in zip(names, row):
            cols[n].append(v)
    return names, cols


def _item_id_field(config: Mapping, names: Sequence[str]) -> str:
    field = str(_get(config, "ITEM_ID_FIELD", "item_id"))
    if field not in names:
        raise CacheError(f"config key 'ITEM_ID_FIELD': {field!r} is not a column of the item file "
                         f"(it has {list(names)})")
    return field


def tower_specs_for(config: Mapping) -> list[TowerSpec]:
    """The config's towers, validated against the columns of the dataset's item file."""
    names, _ = read_item_file(config)
    try:
        return tower_specs(config, names)
    except ValueError as exc:
        raise CacheError(str(exc)) from None


def encoder_depth(spec: TowerSpec) -> int:
    """Number of blocks of a tower's encoder (from its config)."""
    return _enc.encoder_info(spec.encoder, spec.name).n_layers


def model_layers(config: Mapping, specs: Sequence[TowerSpec]) -> dict[str, list[int]]:
    """Hidden-state indices the model reads per tower (its LayerDrop choice); what a dataset
    passes to ``load_states``."""
    infos = {s.name: _enc.encoder_info(s.encoder, s.name) for s in specs}
    return tower_layers_from_config(config, {t: i.n_layers for t, i in infos.items()})


def required_layers(config: Mapping, specs: Sequence[TowerSpec]) -> dict[str, list[int]]:
    """Hidden-state indices to cache per tower: the model's LayerDrop choice, or every hidden
    state with ``cache_layers: all`` (then load the model's rows with ``model_layers``)."""
    if str(_get(config, "cache_layers", "")).lower() == "all":
        infos = {s.name: _enc.encoder_info(s.encoder, s.name) for s in specs}
        return {t: list(range(i.n_layers + 1)) for t, i in infos.items()}
    return model_layers(config, specs)


def _versions() -> dict[str, str]:
    import lmdb
    import transformers

    try:
        import recbole_iisan

        own = getattr(recbole_iisan, "__version__", "?")
    except Exception:  # noqa: BLE001
        own = "?"
    return {"recbole_iisan": own, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "lmdb": ".".join(map(str, lmdb.version())),
            "python": sys.version.split()[0]}


def _text_fingerprint(tokens: Sequence[str], texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for tok, text in sorted(zip(tokens, texts)):
        h.update(tok.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\n")
    return h.hexdigest()


def _image_bytes(store: Any, token: str) -> bytes | None:
    for attr in ("get_bytes", "get_raw", "raw", "get_image_bytes"):
        fn = getattr(store, attr, None)
        if callable(fn):
            return fn(token)
    return None


def _image_fingerprint(store: Any, tokens: Sequence[str]) -> str:
    """sha256 over the tokens and each one's image bytes (or, if the store cannot give raw bytes,
    its decoded pixels)."""
    h = hashlib.sha256()
    for tok in sorted(tokens):
        data = _image_bytes(store, tok)
        if data is None:
            img = store.get_image(tok)
            data = img.tobytes() + repr(img.size).encode()
        h.update(tok.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _store_path(store: Any) -> str:
    for attr in ("path", "store_path", "_path"):
        p = getattr(store, attr, None)
        if p is not None:
            return str(p)
    return repr(store)


# --------------------------------------------------------------------------------------------
# LMDB helpers

def _np_dtype(dtype: str) -> np.dtype:
    return {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32),
            "bfloat16": np.dtype(np.uint16)}[dtype]


def _to_bytes(states: torch.Tensor, dtype: str, source: str = "") -> np.ndarray:
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


def _open_env(folder: Path, map_size: int, readonly: bool = False) -> Any:
    import lmdb

    if readonly:
        return lmdb.open(str(folder), readonly=True, lock=False, readahead=False, subdir=True,
                         max_readers=512)
    return lmdb.open(str(folder), map_size=map_size, subdir=True, readahead=False, meminit=False,
                     max_dbs=0)


def read_manifest(cache_path: Path | str) -> dict[str, Any]:
    path = Path(cache_path) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{path} does not exist: not a cache folder (run build_cache)") from None
    except ValueError as exc:
        raise CacheError(f"{path} is not valid JSON ({exc}): delete the folder and rebuild") from None


def is_complete(cache_path: Path | str) -> bool:
    p = Path(cache_path)
    if not (p / COMPLETE).is_file() or not (p / MANIFEST).is_file():
        return False
    try:
        return bool(read_manifest(p).get("complete"))
    except CacheError:
        return False


# --------------------------------------------------------------------------------------------
# integrity

def _damaged(folder: Path, what: str) -> CacheDamagedError:
    return CacheDamagedError(f"cache {folder} is damaged ({what})")


def _folder_digest(folder: Path) -> str:
    return folder.name.rsplit("-", 1)[-1]


def _seed(digest: str, layers: Sequence[int]) -> int:
    """The start value of every value's crc32: ties the values to this folder and layer set."""
    return zlib.crc32(f"recbole_iisan cache {digest} layers {','.join(map(str, layers))}".encode())


def _crc(key: bytes, payload: Any, seed: int) -> int:
    return zlib.crc32(payload, zlib.crc32(key, seed))


def _lmdb_header(folder: Path) -> dict[str, int]:
    """Size, page size, last page and entry count of ``data.mdb`` read from its two meta pages
    (LMDB's on-disk format, 64-bit), checked so that opening it cannot read past the end of the
    file (a truncated file would otherwise end the process with SIGBUS)."""
    import struct

    path = folder / DATA
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4096)
            psize = struct.unpack_from("<I", head, 40)[0] if len(head) >= 48 else 0
            if psize in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536) and psize != 4096:
                f.seek(0)
                head = f.read(psize)
            f.seek(psize)
            second = f.read(psize)
    except FileNotFoundError:
        raise _damaged(folder, f"no {DATA}") from None
    except OSError as exc:
        raise _damaged(folder, f"{DATA} cannot be read: {exc}") from None
    if size < 2 * max(psize, 4096) or len(second) < 152:
        raise _damaged(folder, f"{DATA} has {size} bytes, less than LMDB's two header pages")
    metas = []
    for raw in (head, second):
        flags = struct.unpack_from("<H", raw, 10)[0]
        magic, version = struct.unpack_from("<II", raw, 16)
        if not flags & 0x08 or magic != 0xBEEFC0DE or version != 1:
            raise _damaged(folder, f"{DATA} has no valid LMDB header")
        entries = struct.unpack_from("<Q", raw, 120)[0]
        last_pg, txnid = struct.unpack_from("<QQ", raw, 136)
        metas.append((txnid, last_pg, entries))
    txnid, last_pg, entries = max(metas)
    need = (last_pg + 1) * psize
    if size < need:
        raise _damaged(folder, f"{DATA} has {size} bytes, its LMDB header needs {need}: truncated "
                               f"(a partial copy or a full disk)")
    return {"size": size, "psize": psize, "last_pg": last_pg, "entries": entries, "txnid": txnid}


def _check_manifest(folder: Path, man: Mapping[str, Any]) -> tuple[int, int]:
    """Everything the manifest says about the stored values agrees with itself and with the
    folder's name; returns ``(value bytes, crc seed)``."""
    ident = man.get("identity")
    if not isinstance(ident, dict):
        raise _damaged(folder, f"{MANIFEST} has no identity")
    if _digest(ident) != _folder_digest(folder):
        raise _damaged(folder, f"the identity in {MANIFEST} has digest {_digest(ident)}, "
                               f"the folder name says {_folder_digest(folder)}")
    for key in ("weights_fingerprint", "model_type", "n_layers", "dim", "pooling", "dataset_fingerprint",
                "dtype", "encoder_dtype", "max_length", "fields"):
        if key in ident and man.get(key) != ident[key]:
            raise _damaged(folder, f"{MANIFEST} key '{key}' is {man.get(key)!r}, its identity says {ident[key]!r}")
    layers = man.get("layers")
    n_layers = int(ident.get("n_layers", -1))
    if (not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers)
            or layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] <= n_layers):
        raise _damaged(folder, f"{MANIFEST} key 'layers' is {layers!r}, expected sorted hidden-state "
                               f"indices in 0..{n_layers}")
    if ident.get("dtype") not in CACHE_DTYPES:
        raise _damaged(folder, f"{MANIFEST} has dtype {ident.get('dtype')!r}")
    value_bytes = len(layers) * int(ident["dim"]) * _np_dtype(ident["dtype"]).itemsize + CRC_BYTES
    store = man.get("store")
    if man.get("complete"):
        if not isinstance(store, dict):
            raise _damaged(folder, f"{MANIFEST} has no 'store' record")
        if store.get("value_bytes") != value_bytes:
            raise _damaged(folder, f"{MANIFEST} records values of {store.get('value_bytes')} bytes, "
                                   f"its layers, dim and dtype give {value_bytes}")
        if store.get("entries") != man.get("item_count"):
            raise _damaged(folder, f"{MANIFEST} records {store.get('entries')} entries and "
                                   f"{man.get('item_count')} items")
    return value_bytes, _seed(_folder_digest(folder), layers)


def _check_complete_store(folder: Path, man: Mapping[str, Any]) -> tuple[int, int]:
    """All checks that need no LMDB: manifest, file size and LMDB header against the manifest.
    Run before every ``lmdb.open`` of a complete cache. Returns ``(value bytes, crc seed)``."""
    value_bytes, seed = _check_manifest(folder, man)
    head = _lmdb_header(folder)
    store = man["store"]
    if head["size"] != store.get("data_bytes"):
        raise _damaged(folder, f"{DATA} has {head['size']} bytes, {store.get('data_bytes')} when it was "
                               f"completed (a partial copy, a full disk or another file)")
    if head["entries"] != store["entries"]:
        raise _damaged(folder, f"{DATA} holds {head['entries']} entries, {store['entries']} when it was completed")
    return value_bytes, seed


def _scan(folder: Path, env: Any, value_bytes: int, seed: int, keep: Callable[[bytes], bool] | None = None
          ) -> tuple[list[bytes], list[bytes]]:
    """Check every record of an open store: ``(good keys, bad keys)``; a key is bad when its
    value has the wrong size or checksum or ``keep(key)`` is false."""
    good: list[bytes] = []
    bad: list[bytes] = []
    n = value_bytes - CRC_BYTES
    with env.begin(buffers=True) as txn:
        for key, val in txn.cursor():
            k = bytes(key)
            ok = (len(val) == value_bytes and (keep is None or keep(k))
                  and _crc(k, val[:n], seed) == int.from_bytes(val[n:], "little"))
            (good if ok else bad).append(k)
    return good, bad


def verify_cache(cache_path: Path | str) -> dict[str, Any]:
    """Check a complete cache in full: the manifest, ``data.mdb``'s size and header (before LMDB
    opens it), the number of entries and every value's size and checksum. Returns the manifest;
    raises ``CacheError`` (one line naming the folder) otherwise."""
    import lmdb

    folder = Path(cache_path)
    man = read_manifest(folder)
    if not is_complete(folder):
        raise CacheError(f"cache {folder} is incomplete (no {COMPLETE} marker): run "
                         f"python -m recbole_iisan.build_cache to finish it")
    value_bytes, seed = _check_complete_store(folder, man)
    try:
        env = _open_env(folder, 0, readonly=True)
        try:
            good, bad = _scan(folder, env, value_bytes, seed)
        finally:
            env.close()
    except lmdb.Error as exc:
        raise _damaged(folder, f"LMDB: {' '.join(str(exc).split())}") from None
    if bad:
        raise _damaged(folder, f"{len(bad)} stored values fail their checksum, first item "
                               f"{bad[0].decode('utf-8', 'replace')!r}")
    if len(good) != man["item_count"]:
        raise _damaged(folder, f"{len(good)} values stored, {man['item_count']} recorded")
    return man


# --------------------------------------------------------------------------------------------
# build or reuse

def _identity(spec: TowerSpec, info: Any, pooling: str, fingerprint: str, dataset_fp: str,
              dtype: str, encoder_dtype: str, image_store: Any) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "tower_kind": spec.kind,
        "weights_fingerprint": fingerprint,
        "model_type": info.model_type,
        "n_layers": info.n_layers,
        "dim": info.dim,
        "pooling": pooling,
        "dataset_fingerprint": dataset_fp,
        "dtype": dtype,
        "encoder_dtype": encoder_dtype,
    }
    if spec.is_image:
        ident["image_preprocessing"] = _imgtf.preprocessing_identity(dict(spec.extra).get("image_backend", "pil"))
    else:
        ident["max_length"] = int(spec.max_length)
        ident["fields"] = list(spec.fields)
    return ident


def _digest(ident: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def _explain_others(root: Path, prefix: str, ident: Mapping[str, Any], target: Path) -> None:
    """Log why other caches of the same tower and encoder are not used."""
    for other in sorted(root.glob(prefix + "*")):
        if other == target or not (other / MANIFEST).is_file():
            continue
        try:
            old = read_manifest(other).get("identity", {})
        except CacheError:
            continue
        diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        if diff:
            logger.info(f"cache {other.name} is for other settings (differs in {', '.join(diff)}): not used")


def ensure_cache(config: Mapping, spec: TowerSpec, layers: Sequence[int], item_tokens: Sequence[str],
                 item_texts: Sequence[str] | None = None, image_store: Any = None, *,
                 on_batch: Callable[[int, int], None] | None = None) -> Path:
    """Build (or reuse, or resume) the cache of one tower over ``item_tokens``; returns its folder.

    ``item_texts[i]`` is the text of ``item_tokens[i]`` (text towers); ``image_store`` an
    ``ImageStore`` (image towers). Items without an image follow ``missing_image``: ``error``
    raises ``CacheError``, ``zeros`` leaves them out of the cache (``load_states`` reports them).
    ``on_batch(n_done, n_total)`` is called after each committed batch.
    """
    dtype = str(_get(config, "cache_dtype", "float16"))
    if dtype not in CACHE_DTYPES:
        raise CacheError(f"config key 'cache_dtype': expected one of {CACHE_DTYPES}, got {dtype!r}")
    encoder_dtype = str(_get(config, "encoder_dtype", "float32"))
    policy = str(_get(config, "cache_rebuild", "auto"))
    if policy not in ("auto", "never"):
        raise CacheError(f"config key 'cache_rebuild': expected auto or never, got {policy!r}")
    batch_size = int(_get(config, "encoder_batch_size", 64))
    _shards(config)
    tokens = [str(t) for t in item_tokens]
    if len(set(tokens)) != len(tokens):
        raise CacheError(f"tower '{spec.name}': the item tokens are not unique")
    info = _enc.encoder_info(spec.encoder, spec.name)
    try:
        pooling = _enc.resolve_pooling(spec.pooling, info.is_decoder, spec.is_image)
    except ValueError as exc:
        raise CacheError(f"config key '{spec.name}_pooling': {exc}") from None
    if spec.is_image:  # resolved once here, so every worker decodes the same way
        try:
            backend = _imgtf.resolve_image_backend(dict(spec.extra).get("image_backend", "auto"), spec.name)
        except ValueError as exc:
            raise CacheError(str(exc)) from None
        spec = dataclasses.replace(spec, extra={**dict(spec.extra), "image_backend": backend})
    layers = sorted({int(x) for x in layers})
    bad = [x for x in layers if not 0 <= x <= info.n_layers]
    if bad or not layers:
        raise CacheError(f"tower '{spec.name}': hidden states {bad or layers} requested, encoder "
                         f"'{spec.encoder}' has 0..{info.n_layers}")

    # what to encode
    if spec.is_image:
        if image_store is None:
            raise CacheError(f"tower '{spec.name}' needs item images: pass --image_dir=FOLDER_OR_ZIP "
                             f"or run prepare --images ...")
        have = [t for t in tokens if t in image_store]
        missing = len(tokens) - len(have)
        if missing:
            first = [t for t in tokens if t not in image_store][:5]
            if str(_get(config, "missing_image", "error")) != "zeros":
                raise CacheError(f"tower '{spec.name}': {missing} of {len(tokens)} items have no image "
                                 f"(first: {first}); set missing_image: zeros to use zero states for them")
            logger.warning(f"tower '{spec.name}': {missing} of {len(tokens)} items have no image "
                           f"(first: {first}); not cached, their states will be zeros (missing_image: zeros)")
        work_tokens = sorted(have)
        texts = None
        dataset_fp = _image_fingerprint(image_store, work_tokens)
    else:
        if item_texts is None or len(item_texts) != len(tokens):
            raise CacheError(f"tower '{spec.name}': one text per item is needed")
        texts = [str(t) for t in item_texts]
        work_tokens = tokens
        dataset_fp = _text_fingerprint(tokens, texts)

    fingerprint = _enc.weights_fingerprint(spec.encoder)
    ident = _identity(spec, info, pooling, fingerprint, dataset_fp, dtype, encoder_dtype, image_store)
    root = cache_root(config)
    prefix = f"{spec.name}-{_enc.short_name(spec.encoder)}-"
    folder = root / (prefix + _digest(ident))

    store_layers = layers
    why: str | None = None
    if (folder / MANIFEST).is_file():
        complete = is_complete(folder)
        try:  # everything that identifies the stored values, before they are trusted
            old = read_manifest(folder)
            _check_manifest(folder, old)
            if old.get("identity") != ident:
                raise _damaged(folder, f"its {MANIFEST} identity differs from the settings its name stands for")
            if complete:
                verify_cache(folder)
            elif (folder / DATA).exists():
                _lmdb_header(folder)
        except CacheError as exc:
            why = str(exc)
        else:
            old_layers = [int(x) for x in old["layers"]]
            if set(layers) <= set(old_layers):
                if complete:
                    logger.info(f"cache {spec.name}: reusing {folder} (stores hidden states {old_layers}, "
                                f"model reads {layers}; every value verified)")
                    return folder
                store_layers = old_layers  # resume an interrupted build
            else:
                why = f"cache {folder.name} stores layers {old_layers}, model needs {layers}"
                if complete:
                    store_layers = sorted(set(layers) | set(old_layers))
        if why is not None:
            if policy == "never":
                raise CacheError(f"{why} and cache_rebuild is 'never': set cache_rebuild: auto or delete {folder}")
            logger.warning(f"{why}: rebuilding {folder} with hidden states {store_layers}")
            shutil.rmtree(folder)
    elif (folder / DATA).exists():
        why = f"cache {folder} has a {DATA} but no {MANIFEST}"
        if policy == "never":
            raise CacheError(f"{why} and cache_rebuild is 'never': set cache_rebuild: auto or delete {folder}")
        logger.warning(f"{why}: rebuilding it with hidden states {store_layers}")
        shutil.rmtree(folder)
    else:
        _explain_others(root, prefix, ident, folder)
    folder.mkdir(parents=True, exist_ok=True)

    resolved, load_kwargs = _enc.resolve_encoder(spec.encoder)
    manifest: dict[str, Any] = {
        "tower": spec.name,
        "encoder": spec.encoder,
        "resolved_path": resolved,
        "load_kwargs": load_kwargs,
        "weights_fingerprint": fingerprint,
        "model_type": info.model_type,
        "n_layers": info.n_layers,
        "dim": info.dim,
        "is_decoder": info.is_decoder,
        "pooling": pooling,
        "layers": store_layers,
        "dtype": dtype,
        "encoder_dtype": encoder_dtype,
        "item_count": len(work_tokens),
        "dataset_items": len(tokens),
        "dataset_fingerprint": dataset_fp,
        "versions": _versions(),
        "identity": ident,
        "complete": False,
    }
    if spec.is_image:
        meta = getattr(image_store, "meta", None)
        manifest["image_store"] = {"path": _store_path(image_store),
                                   "meta": meta() if callable(meta) else meta}
        manifest["missing_items"] = len(tokens) - len(work_tokens)
    else:
        manifest["max_length"] = int(spec.max_length)
        manifest["fields"] = list(spec.fields)
    atomic_write_json(folder / MANIFEST, manifest)

    seed = _seed(_folder_digest(folder), store_layers)
    seconds, n_new, manifest["store"] = _build(config, spec, folder, store_layers, work_tokens, texts,
                                               image_store, info, dtype, encoder_dtype, batch_size, on_batch, seed)
    manifest["complete"] = True
    manifest["build_seconds"] = round(seconds, 3)
    atomic_write_json(folder / MANIFEST, manifest)
    atomic_write_text(folder / COMPLETE, time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    size_mb = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20
    rate = n_new / seconds if seconds > 0 else float("inf")
    logger.info(f"cache {spec.name}: {len(work_tokens)} items, {rate:.1f} items/s, {size_mb:.1f} MB ({folder})")
    return folder


def _build(config: Mapping, spec: TowerSpec, folder: Path, layers: list[int], tokens: list[str],
           texts: list[str] | None, image_store: Any, info: Any, dtype: str, encoder_dtype: str,
           batch_size: int, on_batch: Callable[[int, int], None] | None, seed: int
           ) -> tuple[float, int, dict[str, Any]]:
    """Encode the items not stored yet, one LMDB transaction per batch, by this process or by
    ``cache_shards`` workers; check every stored value. Returns (seconds, n encoded, store record)."""
    from tqdm import tqdm

    row_bytes = len(layers) * info.dim * _np_dtype(dtype).itemsize
    value_bytes = row_bytes + CRC_BYTES
    pages = -(-(value_bytes + 64) // 4096) + 1
    map_size = int(len(tokens) * pages * 4096 * 1.5) + 64 * 2**20
    device = _get(config, "device", "cpu") or "cpu"
    n_shards = _shards(config)
    want = {t.encode("utf-8") for t in tokens}
    env = _open_env(folder, map_size)
    try:
        # what an interrupted build left: values that pass their check count as stored; others
        # (a damaged page, a key of no item) are dropped and encoded again
        good, bad = _scan(folder, env, value_bytes, seed, keep=want.__contains__)
        if bad:
            logger.warning(f"cache {spec.name}: dropping {len(bad)} stored values that fail their check "
                           f"(first {bad[0].decode('utf-8', 'replace')!r}); they are encoded again")
            with env.begin(write=True) as txn:
                for k in bad:
                    txn.delete(k)
        stored = set(good)
        encoder = None
        ids = None
        if texts is not None:
            # tokenise everything once (cheap) to get the length order: the batches, and so each
            # text's padding, are the same whatever the number of shards
            encoder = _enc.load_frozen_encoder(spec, device, encoder_dtype)
            ids = encoder.tokenize(texts)
            order = encoder.length_order(ids)
        else:
            order = list(range(len(tokens)))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        todo = [b for b in batches if any(tokens[i].encode("utf-8") not in stored for i in b)]
        n_todo = sum(len(b) for b in todo)
        if stored:
            logger.info(f"cache {spec.name}: resuming, {len(tokens) - n_todo} of {len(tokens)} items already stored")
        t0 = time.perf_counter()
        done = 0
        if todo:
            workers = min(n_shards, len(todo))
            payloads = [[ids[i] for i in b] if texts is not None else [tokens[i] for i in b] for b in todo]
            if workers > 1:
                encoder = None  # the workers load their own copies
                address = _get(config, "ray_address")
                runner: Any = (_RayRunner(spec, device, encoder_dtype, layers, dtype, image_store, workers,
                                          str(address)) if address else
                               _LocalRunner(spec, device, encoder_dtype, layers, dtype, image_store, workers))
                logger.info(f"cache {spec.name}: {n_todo} items in {len(todo)} batches over {runner.describe()}")
            else:
                if encoder is None:
                    encoder = _enc.load_frozen_encoder(spec, device, encoder_dtype)
                if encoder.info.dim != info.dim or encoder.info.n_layers != info.n_layers:
                    raise CacheError(f"encoder '{spec.encoder}' changed while building {folder}")
                runner = _InProcess(encoder, layers, dtype, image_store, payloads)
            bar = tqdm(total=n_todo, desc=f"cache {spec.name}", unit="item", disable=None, leave=False)
            try:
                for k, arr in runner.run(payloads):
                    batch = todo[k]
                    if arr.shape != (len(batch), len(layers), info.dim):
                        raise CacheError(f"encoder '{spec.encoder}' gave states of shape {arr.shape} while "
                                         f"building {folder}, expected {(len(batch), len(layers), info.dim)}")
                    _put_batch(env, [tokens[i].encode("utf-8") for i in batch], arr, seed)
                    done += len(batch)
                    bar.update(len(batch))
                    if on_batch is not None:
                        on_batch(done, n_todo)
            except _WorkerDied as exc:
                raise CacheError(f"cache {folder}: an encoder worker died ({exc}); {done + len(tokens) - n_todo} "
                                 f"of {len(tokens)} items are stored: run the build again to resume") from None
            finally:
                bar.close()
                runner.close()
            env.sync(True)
        seconds = time.perf_counter() - t0
        good, bad = _scan(folder, env, value_bytes, seed, keep=want.__contains__)
    finally:
        env.close()
    if bad or len(good) != len(want):
        raise _damaged(folder, f"after the build {len(bad)} stored values fail their check and "
                               f"{len(want) - len(good)} items are missing: run the build again")
    head = _lmdb_header(folder)
    store = {"data_bytes": head["size"], "entries": head["entries"], "value_bytes": value_bytes,
             "checksum": "crc32: 4 bytes little-endian after each value, crc32(value, crc32(key, seed)), "
                         "seed = crc32 of the folder digest and the stored layers"}
    return seconds, done, store


def _shards(config: Mapping) -> int:
    n = _get(config, "cache_shards", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CacheError(f"config key 'cache_shards': expected an integer >= 1, got {n!r}")
    return n


def _put_batch(env: Any, keys: list[bytes], arr: np.ndarray, seed: int) -> None:
    """One transaction for one encoded batch. Keys already stored (a concurrent build of the same
    folder wrote them) are left as they are, so a finished store does not change."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for r, key in enumerate(keys):
                    if txn.get(key) is not None:
                        continue
                    payload = arr[r].tobytes()
                    txn.put(key, payload + _crc(key, payload, seed).to_bytes(CRC_BYTES, "little"))
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


# --------------------------------------------------------------------------------------------
# who encodes: this process, local worker processes, or Ray actors

def _encode_payload(encoder: Any, payload: list, layers: list[int], dtype: str, store: Any) -> np.ndarray:
    """One batch (token ids of texts, or item tokens of an image tower) -> states in the storage dtype."""
    if encoder.is_image:
        states = encoder.encode_pixels(encoder.preprocess_bytes(store.get_bytes_many(payload)), layers)
    else:
        states = encoder.encode_ids(payload, layers)
    return _to_bytes(states, dtype, f"tower '{encoder.tower}': encoder '{encoder.name}'")


class _WorkerDied(Exception):
    pass


class _InProcess:
    """The one-shard case: this process encodes (image batches prefetched in a thread)."""

    def __init__(self, encoder: Any, layers: list[int], dtype: str, store: Any, payloads: list) -> None:
        self.encoder, self.layers, self.dtype, self.store = encoder, layers, dtype, store
        self.prefetch = _Prefetcher(encoder, store, payloads) if encoder.is_image else None

    def run(self, payloads: list) -> Any:
        for k, payload in enumerate(payloads):
            if self.prefetch is not None:
                states = self.encoder.encode_pixels(self.prefetch.get(k), self.layers)
                yield k, _to_bytes(states, self.dtype, f"tower '{self.encoder.tower}': encoder '{self.encoder.name}'")
            else:
                yield k, _encode_payload(self.encoder, payload, self.layers, self.dtype, self.store)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()


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
    return k, _encode_payload(w["encoder"], payload, w["layers"], w["dtype"], w["store"])


def _cuda_devices(device: str, workers: int) -> list[str]:
    """One device per worker: the GPUs in turn when ``device`` is cuda, else ``device``."""
    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{s % torch.cuda.device_count()}" for s in range(workers)]
    return [str(device)] * workers


class _LocalRunner:
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
                    raise _WorkerDied(" ".join(str(exc).split()) or "a worker process ended") from None
                nxt += 1
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for f in sorted(finished, key=pending.__getitem__):
                del pending[f]
                try:
                    yield f.result()
                except BrokenProcessPool as exc:
                    raise _WorkerDied(" ".join(str(exc).split()) or "a worker process ended") from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.devices.close()


class _RayEncoder:
    """A Ray actor holding one encoder (one GPU when the cluster has GPUs)."""

    def __init__(self, spec: TowerSpec, device: str, encoder_dtype: str, threads: int, layers: list[int],
                 dtype: str, store: Any) -> None:
        _worker_init(spec, device, encoder_dtype, threads, layers, dtype, store)

    def encode(self, k: int, payload: list) -> tuple[int, np.ndarray]:
        return _worker_encode(k, payload)


class _RayRunner:
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
                    raise _WorkerDied(" ".join(str(exc).split())[:300]) from None

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()


class _Prefetcher:
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


# --------------------------------------------------------------------------------------------
# all towers of a config

def _find_image_store(config: Mapping, tokens: Sequence[str], tower: str) -> Any:
    try:
        from recbole_iisan.data import images as _img
    except ImportError as exc:
        raise CacheError(f"tower '{tower}' needs recbole_iisan.data.images ({exc})") from None
    ds_dir = dataset_dir(config)
    dataset = str(_get(config, "dataset"))
    store_path = Path(_img.default_image_store_path(ds_dir.parent, dataset))
    image_dir = _get(config, "image_dir")
    if image_dir:  # a no-op when the store is up to date with this source and item set
        src = Path(os.path.expanduser(str(image_dir)))
        if not src.exists():
            raise CacheError(f"config key 'image_dir': {src} does not exist")
        logger.info(f"importing images from {src} into {store_path}")
        _img.import_images(src, store_path, item_tokens=list(tokens))
    if not store_path.exists():
        raise CacheError(f"tower '{tower}' needs item images: pass --image_dir=FOLDER_OR_ZIP or run "
                         f"prepare --images ... (no image store {store_path})")
    return _img.ImageStore(store_path)


def ensure_caches(config: Mapping) -> dict[str, Path]:
    """Build or reuse the cache of every tower of ``config`` over every item of the dataset's
    ``.item`` file (independent of RecBole's later filtering). Returns ``{tower: folder}``."""
    names, cols = read_item_file(config)
    try:
        specs = tower_specs(config, names)
    except ValueError as exc:
        raise CacheError(str(exc)) from None
    tokens = cols[_item_id_field(config, names)]
    layers = required_layers(config, specs)
    out: dict[str, Path] = {}
    for spec in specs:
        if spec.is_image:
            store = _find_image_store(config, tokens, spec.name)
            out[spec.name] = ensure_cache(config, spec, layers[spec.name], tokens, image_store=store)
        else:
            texts = [". ".join(v for v in (cols[f][i].strip() for f in spec.fields) if v)
                     for i in range(len(tokens))]
            empty = sum(1 for t in texts if not t)
            if empty:
                first = [tokens[i] for i, t in enumerate(texts) if not t][:5]
                logger.warning(f"tower '{spec.name}': {empty} items have an empty {'/'.join(spec.fields)} "
                               f"(first: {first}); encoded as the empty string")
            out[spec.name] = ensure_cache(config, spec, layers[spec.name], tokens, item_texts=texts)
    return out


# --------------------------------------------------------------------------------------------
# read

def load_states(cache_path: Path | str, tokens: Sequence[str], layers: Sequence[int],
                dtype: torch.dtype = torch.float16, *, verify: bool = True) -> tuple[torch.Tensor, list[int]]:
    """``(states [len(tokens), len(layers), dim], missing positions)`` from a complete cache.

    One preallocated tensor, one read transaction; rows of absent tokens are zeros. The manifest,
    the size of ``data.mdb`` and its LMDB header are checked before LMDB opens it; ``verify``
    also checks each value read against its checksum. A damaged cache raises ``CacheError``.
    """
    import lmdb

    folder = Path(cache_path)
    man = read_manifest(folder)
    if not is_complete(folder):
        raise CacheError(f"cache {folder} is incomplete (no {COMPLETE} marker): run "
                         f"python -m recbole_iisan.build_cache to finish it")
    try:
        value_bytes, seed = _check_complete_store(folder, man)
    except CacheDamagedError as exc:
        raise CacheDamagedError(f"{exc}: {_REBUILD}") from None
    stored = [int(x) for x in man["layers"]]
    layers = [int(x) for x in layers]
    absent = [x for x in layers if x not in stored]
    if absent:
        raise CacheError(f"cache {folder} stores hidden states {stored}, asked for {layers}: "
                         f"run build_cache with the model's settings")
    dim, store_dtype = int(man["dim"]), str(man["dtype"])
    np_dt = _np_dtype(store_dtype)
    rows = [stored.index(x) for x in layers]
    whole = rows == list(range(len(stored)))
    contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
    torch_store = getattr(torch, store_dtype)
    out = torch.zeros((len(tokens), len(layers), dim), dtype=torch_store)
    target = out.view(torch.int16).numpy().view(np.uint16) if store_dtype == "bfloat16" else out.numpy()
    n_bytes = value_bytes - CRC_BYTES
    n_values = len(stored) * dim
    missing: list[int] = []
    try:
        env = _open_env(folder, 0, readonly=True)
        try:
            with env.begin(buffers=True) as txn:
                for pos, tok in enumerate(tokens):
                    key = str(tok).encode("utf-8")
                    buf = txn.get(key)
                    if buf is None:
                        missing.append(pos)
                        continue
                    if len(buf) != value_bytes:
                        raise _damaged(folder, f"the value of item {tok!r} has {len(buf)} bytes, expected {value_bytes}")
                    if verify and _crc(key, buf[:n_bytes], seed) != int.from_bytes(buf[n_bytes:], "little"):
                        raise _damaged(folder, f"the value of item {tok!r} fails its checksum")
                    arr = np.frombuffer(buf, dtype=np_dt, count=n_values).reshape(len(stored), dim)
                    if whole:
                        target[pos] = arr
                    elif contiguous:
                        target[pos] = arr[rows[0]:rows[0] + len(rows)]
                    else:
                        target[pos] = arr[rows]
        finally:
            env.close()
    except lmdb.Error as exc:
        raise _damaged(folder, f"LMDB: {' '.join(str(exc).split())}") from None
    except CacheDamagedError as exc:
        raise CacheDamagedError(f"{exc}: {_REBUILD}") from None
    if out.dtype != dtype:
        out = out.to(dtype)
    return out, missing


_REBUILD = "rebuild it with python -m recbole_iisan.build_cache (cache_rebuild: auto) or delete the folder"


__all__ = [
    "CacheDamagedError", "CacheError", "verify_cache", "cache_root", "dataset_dir", "encoder_depth", "ensure_cache", "ensure_caches",
    "is_complete", "load_states", "model_layers", "read_item_file", "read_manifest", "required_layers", "tower_specs_for",
]
