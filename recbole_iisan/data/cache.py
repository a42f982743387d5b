"""The hidden-state cache: each frozen encoder runs once over every item of the dataset's ``.item``
file; the pooled states of the hidden states the model reads are kept in an LMDB store.

Layout: ``<cache_dir>/<tower>-<short encoder name>-<12-hex digest>/`` holding ``data.mdb`` (key =
item token utf-8, value = the raw bytes of a contiguous ``[n_stored_layers, dim]`` array in
``cache_dtype``), ``manifest.json`` and, written last, ``COMPLETE``.

The digest covers everything that changes the stored values except the set of layers: weights
fingerprint, pooling, max length, fields, the items and their texts (or image digests), dtypes.
A folder whose stored layers cover the request is reused (only the asked-for rows are read); one
that does not is rebuilt with the union of both layer sets (``cache_rebuild: auto``) or refused
(``cache_rebuild: never``). Builds commit one LMDB transaction per encoder batch, over fixed
batches of the length-sorted item list, so a killed build resumes where it stopped and ends
bitwise equal to an uninterrupted one.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from recbole_iisan.towers import encoders as _enc
from recbole_iisan.towers.spec import TowerSpec, tower_specs
from recbole_iisan.towers.layer_select import tower_layers_from_config
from recbole_iisan.utils import config_get as _get

logger = logging.getLogger("recbole_iisan.cache")

CACHE_DTYPES = ("float16", "bfloat16", "float32")
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
FORMAT_VERSION = 1


from recbole_iisan.errors import CacheError  # noqa: F401




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


def _to_bytes(states: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 [B, L, D] -> numpy array in the storage dtype (bfloat16 as its uint16 bits)."""
    t = states.detach().to("cpu")
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


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        ident["image_preprocessing"] = "AutoImageProcessor or resize224+norm0.5"
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
    tokens = [str(t) for t in item_tokens]
    if len(set(tokens)) != len(tokens):
        raise CacheError(f"tower '{spec.name}': the item tokens are not unique")
    info = _enc.encoder_info(spec.encoder, spec.name)
    try:
        pooling = _enc.resolve_pooling(spec.pooling, info.is_decoder, spec.is_image)
    except ValueError as exc:
        raise CacheError(f"config key '{spec.name}_pooling': {exc}") from None
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
    if (folder / MANIFEST).is_file():
        try:
            old = read_manifest(folder)
        except CacheError as exc:
            logger.warning(f"{exc}")
            old = {}
        old_layers = [int(x) for x in old.get("layers", [])]
        same = old.get("identity") == ident
        covered = set(layers) <= set(old_layers)
        if same and covered and is_complete(folder):
            logger.info(f"cache {spec.name}: reusing {folder} (stores hidden states {old_layers}, "
                        f"model reads {layers})")
            return folder
        if same and covered:
            store_layers = old_layers  # resume an interrupted build
        else:
            why = ("its manifest is for other settings" if not same else
                   f"cache {folder.name} stores layers {old_layers}, model needs {layers}")
            if policy == "never":
                raise CacheError(f"{why} and cache_rebuild is 'never': set cache_rebuild: auto or delete {folder}")
            if same and is_complete(folder):
                store_layers = sorted(set(layers) | set(old_layers))
            logger.warning(f"{why}: rebuilding {folder} with hidden states {store_layers}")
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
    _write_json_atomic(folder / MANIFEST, manifest)

    seconds, n_new = _build(config, spec, folder, store_layers, work_tokens, texts, image_store, info,
                            dtype, encoder_dtype, batch_size, on_batch)
    manifest["complete"] = True
    manifest["build_seconds"] = round(seconds, 3)
    _write_json_atomic(folder / MANIFEST, manifest)
    tmp = folder / f".{COMPLETE}.tmp"
    tmp.write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    os.replace(tmp, folder / COMPLETE)
    size_mb = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20
    rate = n_new / seconds if seconds > 0 else float("inf")
    logger.info(f"cache {spec.name}: {len(work_tokens)} items, {rate:.1f} items/s, {size_mb:.1f} MB ({folder})")
    return folder


def _build(config: Mapping, spec: TowerSpec, folder: Path, layers: list[int], tokens: list[str],
           texts: list[str] | None, image_store: Any, info: Any, dtype: str, encoder_dtype: str,
           batch_size: int, on_batch: Callable[[int, int], None] | None) -> tuple[float, int]:
    """Encode the items not stored yet, one LMDB transaction per batch. Returns (seconds, n encoded)."""
    import lmdb
    from tqdm import tqdm

    row_bytes = len(layers) * info.dim * _np_dtype(dtype).itemsize
    pages = -(-(row_bytes + 64) // 4096) + 1
    map_size = int(len(tokens) * pages * 4096 * 1.5) + 64 * 2**20
    env = _open_env(folder, map_size)
    try:
        with env.begin() as txn:
            stored = {t for t in tokens if txn.get(t.encode("utf-8")) is not None}
        if texts is not None:
            # tokenise everything once with the tokenizer only (cheap) to get a length order
            encoder = _enc.load_frozen_encoder(spec, _get(config, "device", "cpu") or "cpu", encoder_dtype)
            ids = encoder.tokenize(texts)
            order = encoder.length_order(ids)
        else:
            order = list(range(len(tokens)))
            ids = None
            encoder = None
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        todo = [b for b in batches if any(tokens[i] not in stored for i in b)]
        n_todo = sum(len(b) for b in todo)
        if stored:
            logger.info(f"cache {spec.name}: resuming, {len(tokens) - n_todo} of {len(tokens)} items already stored")
        if not todo:
            return 0.0, 0
        if encoder is None:
            encoder = _enc.load_frozen_encoder(spec, _get(config, "device", "cpu") or "cpu", encoder_dtype)
        if encoder.info.dim != info.dim or encoder.info.n_layers != info.n_layers:
            raise CacheError(f"encoder '{spec.encoder}' changed while building {folder}")
        t0 = time.perf_counter()
        done = 0
        bar = tqdm(total=n_todo, desc=f"cache {spec.name}", unit="item", disable=None, leave=False)
        prefetch = _Prefetcher(encoder, image_store, tokens, todo) if texts is None else None
        try:
            for k, batch in enumerate(todo):
                if texts is not None:
                    states = encoder.encode_ids([ids[i] for i in batch], layers)
                else:
                    states = encoder.encode_pixels(prefetch.get(k), layers)
                peak = float(states.detach().abs().amax()) if states.numel() else 0.0
                if dtype == "float16" and not peak <= 65504.0:  # fp16 would store inf (and NaN in training)
                    raise CacheError(f"tower '{spec.name}': encoder '{spec.encoder}' has hidden states up to |h| = "
                                     f"{peak:.4g}, beyond float16's 65504 (cache_dtype: float16); "
                                     f"set --cache_dtype=bfloat16 (or float32)")
                arr = _to_bytes(states, dtype)
                while True:
                    try:
                        with env.begin(write=True) as txn:
                            for r, i in enumerate(batch):
                                txn.put(tokens[i].encode("utf-8"), arr[r].tobytes())
                        break
                    except lmdb.MapFullError:
                        env.set_mapsize(env.info()["map_size"] * 2)
                done += len(batch)
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(done, n_todo)
        finally:
            bar.close()
            if prefetch is not None:
                prefetch.close()
        env.sync(True)
        return time.perf_counter() - t0, done
    finally:
        env.close()


class _Prefetcher:
    """Reads and preprocesses the next image batch in a thread while the model runs."""

    def __init__(self, encoder: Any, store: Any, tokens: list[str], batches: list[list[int]]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.encoder, self.store, self.tokens, self.batches = encoder, store, tokens, batches
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.futures: dict[int, Any] = {}
        self._submit(0)

    def _load(self, k: int) -> torch.Tensor:
        images = self.store.get_images([self.tokens[i] for i in self.batches[k]])
        return self.encoder.preprocess_images(images)

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
                dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, list[int]]:
    """``(states [len(tokens), len(layers), dim], missing positions)`` from a complete cache.

    One preallocated tensor, one read transaction; rows of absent tokens are zeros.
    """
    folder = Path(cache_path)
    man = read_manifest(folder)
    if not is_complete(folder):
        raise CacheError(f"cache {folder} is incomplete (no {COMPLETE} marker): run "
                         f"python -m recbole_iisan.build_cache to finish it")
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
    n_bytes = len(stored) * dim * np_dt.itemsize
    missing: list[int] = []
    env = _open_env(folder, 0, readonly=True)
    try:
        with env.begin(buffers=True) as txn:
            for pos, tok in enumerate(tokens):
                buf = txn.get(str(tok).encode("utf-8"))
                if buf is None:
                    missing.append(pos)
                    continue
                if len(buf) != n_bytes:
                    raise CacheError(f"cache {folder}: value of item {tok!r} has {len(buf)} bytes, "
                                     f"expected {n_bytes}: delete the folder and rebuild")
                arr = np.frombuffer(buf, dtype=np_dt).reshape(len(stored), dim)
                if whole:
                    target[pos] = arr
                elif contiguous:
                    target[pos] = arr[rows[0]:rows[0] + len(rows)]
                else:
                    target[pos] = arr[rows]
    finally:
        env.close()
    if out.dtype != dtype:
        out = out.to(dtype)
    return out, missing


__all__ = [
    "CacheError", "cache_root", "dataset_dir", "encoder_depth", "ensure_cache", "ensure_caches",
    "is_complete", "load_states", "model_layers", "read_item_file", "read_manifest", "required_layers", "tower_specs_for",
]
