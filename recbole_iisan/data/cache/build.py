"""Building the caches of a config's towers: ``ensure_cache`` (one tower) and ``ensure_caches``
(every tower of a config over every item of the dataset's ``.item`` file).

``ensure_cache`` checks the settings, works out the items and the identity (so the folder), lets
``reuse.prepare_folder`` reuse, resume or clear that folder, writes the manifest, fills the store
and marks it complete. Builds commit one LMDB transaction per encoder batch, over fixed batches of
the length-sorted item list, so a killed build resumes where it stopped and ends bitwise equal to
an uninterrupted one, whoever encodes the batches (``workers.py``).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from recbole_iisan.data.cache.identity import (digest, identity, image_fingerprint, store_path,
                                               text_fingerprint)
from recbole_iisan.data.cache.integrity import damaged, lmdb_header, scan
from recbole_iisan.data.cache.layout import (CACHE_DTYPES, COMPLETE, CRC_BYTES, MANIFEST, crc_seed, folder_digest,
                                             np_dtype, open_env, put_batch)
from recbole_iisan.data.cache.paths import (cache_root, find_image_store, item_id_field, read_item_file,
                                            required_layers, tower_specs_for)
from recbole_iisan.data.cache.reuse import prepare_folder
from recbole_iisan.data.cache.workers import InProcess, WorkerDied, start_runner
from recbole_iisan.towers import encoders as _enc
from recbole_iisan.towers import image_transform as _imgtf
from recbole_iisan.towers.spec import TowerSpec
from recbole_iisan.utils.errors import CacheError
from recbole_iisan.utils.files import atomic_write_json, atomic_write_text
from recbole_iisan.data.images import check_missing_images
from recbole_iisan.utils.files import optional, setting

logger = logging.getLogger("recbole_iisan.cache")

OnBatch = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The config keys a build reads, checked."""
    dtype: str  # cache_dtype
    encoder_dtype: str
    policy: str  # cache_rebuild
    batch_size: int  # encoder_batch_size
    shards: int  # cache_shards
    device: Any  # a str, or RecBole's torch.device
    ray_address: Any  # None: local worker processes


def _shards(config: Mapping) -> int:
    n = setting(config, "cache_shards")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CacheError(f"config key 'cache_shards': expected an integer >= 1, got {n!r}")
    return n


def _settings(config: Mapping) -> _Settings:
    dtype = str(setting(config, "cache_dtype"))
    if dtype not in CACHE_DTYPES:
        raise CacheError(f"config key 'cache_dtype': expected one of {CACHE_DTYPES}, got {dtype!r}")
    encoder_dtype = str(setting(config, "encoder_dtype"))
    policy = str(setting(config, "cache_rebuild"))
    if policy not in ("auto", "never"):
        raise CacheError(f"config key 'cache_rebuild': expected auto or never, got {policy!r}")
    batch_size = int(setting(config, "encoder_batch_size"))
    device = optional(config, "device") or "cpu"  # RecBole's runtime device (a plain dict: the CPU)
    return _Settings(dtype, encoder_dtype, policy, batch_size, _shards(config), device, setting(config, "ray_address"))


@dataclasses.dataclass
class _Items:
    """What one tower's cache is built over."""
    tokens: list[str]  # every item asked for
    work_tokens: list[str]  # the items stored (an image tower: those with an image)
    texts: list[str] | None  # the text of each of ``tokens`` (text towers)
    fingerprint: str  # of the items and their texts or images


# --------------------------------------------------------------------------------------------
# one tower: what to build

def _resolve_tower(spec: TowerSpec, info: Any) -> tuple[TowerSpec, str]:
    """``(spec, pooling)`` with the pooling and (image towers) the image backend resolved once
    here, so every worker encodes the same way."""
    try:
        pooling = _enc.resolve_pooling(spec.pooling, info.is_decoder, spec.is_image)
    except ValueError as exc:
        raise CacheError(f"config key '{spec.name}_pooling': {exc}") from None
    if spec.is_image:
        try:
            backend = _imgtf.resolve_image_backend(dict(spec.extra).get("image_backend", "auto"), spec.name)
        except ValueError as exc:
            raise CacheError(str(exc)) from None
        spec = dataclasses.replace(spec, extra={**dict(spec.extra), "image_backend": backend})
    return spec, pooling


def _checked_layers(spec: TowerSpec, info: Any, layers: Sequence[int]) -> list[int]:
    layers = sorted({int(x) for x in layers})
    bad = [x for x in layers if not 0 <= x <= info.n_layers]
    if bad or not layers:
        raise CacheError(f"tower '{spec.name}': hidden states {bad or layers} requested, encoder "
                         f"'{spec.encoder}' has 0..{info.n_layers}")
    return layers


def _image_items(config: Mapping, spec: TowerSpec, tokens: list[str], image_store: Any) -> _Items:
    """The items that have an image; the others follow ``missing_image``."""
    if image_store is None:
        raise CacheError(f"tower '{spec.name}' needs item images: pass --image_dir=FOLDER_OR_ZIP "
                         f"or run prepare --images ...")
    have = [t for t in tokens if t in image_store]
    check_missing_images(config, spec.name, [t for t in tokens if t not in image_store], len(tokens),
                         "zero states (not cached)")
    work_tokens = sorted(have)
    return _Items(tokens, work_tokens, None, image_fingerprint(image_store, work_tokens))


def _text_items(spec: TowerSpec, tokens: list[str], item_texts: Sequence[str] | None) -> _Items:
    if item_texts is None or len(item_texts) != len(tokens):
        raise CacheError(f"tower '{spec.name}': one text per item is needed")
    texts = [str(t) for t in item_texts]
    return _Items(tokens, tokens, texts, text_fingerprint(tokens, texts))


# --------------------------------------------------------------------------------------------
# one tower: the manifest

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


def _manifest(spec: TowerSpec, info: Any, pooling: str, ident: Mapping[str, Any], layers: list[int],
              items: _Items, image_store: Any) -> dict[str, Any]:
    """The manifest of a build in progress (``complete`` false)."""
    resolved, load_kwargs = _enc.resolve_encoder(spec.encoder)
    manifest: dict[str, Any] = {
        "tower": spec.name,
        "encoder": spec.encoder,
        "resolved_path": resolved,
        "load_kwargs": load_kwargs,
        "weights_fingerprint": ident["weights_fingerprint"],
        "model_type": info.model_type,
        "n_layers": info.n_layers,
        "dim": info.dim,
        "is_decoder": info.is_decoder,
        "pooling": pooling,
        "layers": layers,
        "dtype": ident["dtype"],
        "encoder_dtype": ident["encoder_dtype"],
        "item_count": len(items.work_tokens),
        "dataset_items": len(items.tokens),
        "dataset_fingerprint": items.fingerprint,
        "versions": _versions(),
        "identity": ident,
        "complete": False,
    }
    if spec.is_image:
        meta = getattr(image_store, "meta", None)
        manifest["image_store"] = {"path": store_path(image_store), "meta": meta() if callable(meta) else meta}
        manifest["missing_items"] = len(items.tokens) - len(items.work_tokens)
    else:
        manifest["max_length"] = int(spec.max_length)
        manifest["fields"] = list(spec.fields)
    return manifest


def _finish(folder: Path, manifest: dict[str, Any], seconds: float, n_new: int, tower: str) -> None:
    """Mark a built folder complete (the manifest, then ``COMPLETE``) and log what it took."""
    manifest["complete"] = True
    manifest["build_seconds"] = round(seconds, 3)
    atomic_write_json(folder / MANIFEST, manifest)
    atomic_write_text(folder / COMPLETE, time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    size_mb = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20
    rate = n_new / seconds if seconds > 0 else float("inf")
    logger.info(f"cache {tower}: {manifest['item_count']} items, {rate:.1f} items/s, {size_mb:.1f} MB ({folder})")


# --------------------------------------------------------------------------------------------
# one tower

def ensure_cache(config: Mapping, spec: TowerSpec, layers: Sequence[int], item_tokens: Sequence[str],
                 item_texts: Sequence[str] | None = None, image_store: Any = None, *,
                 on_batch: OnBatch | None = None) -> Path:
    """Build (or reuse, or resume) the cache of one tower over ``item_tokens``; returns its folder.

    ``item_texts[i]`` is the text of ``item_tokens[i]`` (text towers); ``image_store`` an
    ``ImageStore`` (image towers). Items without an image follow ``missing_image``: ``error``
    raises ``CacheError``, ``zeros`` leaves them out of the cache (``load_states`` reports them).
    ``on_batch(n_done, n_total)`` is called after each committed batch.
    """
    settings = _settings(config)
    tokens = [str(t) for t in item_tokens]
    if len(set(tokens)) != len(tokens):
        raise CacheError(f"tower '{spec.name}': the item tokens are not unique")
    info = _enc.encoder_info(spec.encoder, spec.name)
    spec, pooling = _resolve_tower(spec, info)
    layers = _checked_layers(spec, info, layers)
    items = (_image_items(config, spec, tokens, image_store) if spec.is_image
             else _text_items(spec, tokens, item_texts))
    ident = identity(spec, info, pooling, _enc.weights_fingerprint(spec.encoder), items.fingerprint,
                     settings.dtype, settings.encoder_dtype)
    prefix = f"{spec.name}-{_enc.short_name(spec.encoder)}-"
    folder = cache_root(config) / (prefix + digest(ident))
    store_layers = prepare_folder(folder, prefix, ident, layers, settings.policy, spec.name)
    if store_layers is None:
        return folder
    manifest = _manifest(spec, info, pooling, ident, store_layers, items, image_store)
    atomic_write_json(folder / MANIFEST, manifest)
    seconds, n_new, manifest["store"] = _Build(settings, spec, info, folder, store_layers, items,
                                               image_store).run(on_batch)
    _finish(folder, manifest, seconds, n_new, spec.name)
    return folder


# --------------------------------------------------------------------------------------------
# one tower: the build loop

class _Build:
    """Encode the items not stored yet into ``folder``, one LMDB transaction per batch, by this
    process or by ``cache_shards`` workers; check every stored value."""

    def __init__(self, settings: _Settings, spec: TowerSpec, info: Any, folder: Path, layers: list[int],
                 items: _Items, image_store: Any) -> None:
        self.settings, self.spec, self.info, self.folder, self.layers = settings, spec, info, folder, layers
        self.tokens, self.texts, self.image_store = items.work_tokens, items.texts, image_store
        self.seed = crc_seed(folder_digest(folder), layers)
        self.value_bytes = len(layers) * info.dim * np_dtype(settings.dtype).itemsize + CRC_BYTES
        self.want = {t.encode("utf-8") for t in self.tokens}
        self.encoder: Any = None

    def run(self, on_batch: OnBatch | None) -> tuple[float, int, dict[str, Any]]:
        """``(seconds, number of items encoded, the manifest's store record)``."""
        pages = -(-(self.value_bytes + 64) // 4096) + 1
        env = open_env(self.folder, int(len(self.tokens) * pages * 4096 * 1.5) + 64 * 2**20)
        try:
            stored = self._keep_good(env)
            payloads, todo = self._todo(stored)
            t0 = time.perf_counter()
            done = 0
            if todo:
                done = self._encode(env, payloads, todo, on_batch)
                env.sync(True)
            seconds = time.perf_counter() - t0
            good, bad = scan(env, self.value_bytes, self.seed, keep=self.want.__contains__)
        finally:
            env.close()
        if bad or len(good) != len(self.want):
            raise damaged(self.folder, f"after the build {len(bad)} stored values fail their check and "
                                       f"{len(self.want) - len(good)} items are missing: run the build again")
        head = lmdb_header(self.folder)
        store = {"data_bytes": head["size"], "entries": head["entries"], "value_bytes": self.value_bytes,
                 "checksum": "crc32: 4 bytes little-endian after each value, crc32(value, crc32(key, seed)), "
                             "seed = crc32 of the folder digest and the stored layers"}
        return seconds, done, store

    def _keep_good(self, env: Any) -> set[bytes]:
        """What an interrupted build left: values that pass their check count as stored; others
        (a damaged page, a key of no item) are dropped and encoded again."""
        good, bad = scan(env, self.value_bytes, self.seed, keep=self.want.__contains__)
        if bad:
            logger.warning(f"cache {self.spec.name}: dropping {len(bad)} stored values that fail their check "
                           f"(first {bad[0].decode('utf-8', 'replace')!r}); they are encoded again")
            with env.begin(write=True) as txn:
                for k in bad:
                    txn.delete(k)
        return set(good)

    def _load_encoder(self) -> Any:
        s = self.settings
        return _enc.load_frozen_encoder(self.spec, s.device, s.encoder_dtype)

    def _todo(self, stored: set[bytes]) -> tuple[list[list], list[list[int]]]:
        """``(payloads, batches)`` of the batches with an item not stored yet. Texts are tokenised
        all at once (cheap) to get the length order: the batches, and so each text's padding, are
        the same whatever the number of shards."""
        tokens, size = self.tokens, self.settings.batch_size
        ids = None
        if self.texts is not None:
            self.encoder = self._load_encoder()
            ids = self.encoder.tokenize(self.texts)
            order = self.encoder.length_order(ids)
        else:
            order = list(range(len(tokens)))
        batches = [order[s:s + size] for s in range(0, len(order), size)]
        todo = [b for b in batches if any(tokens[i].encode("utf-8") not in stored for i in b)]
        if stored:
            logger.info(f"cache {self.spec.name}: resuming, {len(tokens) - sum(len(b) for b in todo)} of "
                        f"{len(tokens)} items already stored")
        payloads = [[ids[i] for i in b] if ids is not None else [tokens[i] for i in b] for b in todo]
        return payloads, todo

    def _runner(self, payloads: list[list], todo: list[list[int]], n_todo: int) -> Any:
        s, spec, info = self.settings, self.spec, self.info
        workers = min(s.shards, len(todo))
        if workers > 1:
            self.encoder = None  # the workers load their own copies
            runner = start_runner(spec, s.device, s.encoder_dtype, self.layers, s.dtype, self.image_store,
                                  workers, s.ray_address)
            logger.info(f"cache {spec.name}: {n_todo} items in {len(todo)} batches over {runner.describe()}")
            return runner
        if self.encoder is None:
            self.encoder = self._load_encoder()
        if self.encoder.info.dim != info.dim or self.encoder.info.n_layers != info.n_layers:
            raise CacheError(f"encoder '{spec.encoder}' changed while building {self.folder}")
        return InProcess(self.encoder, self.layers, s.dtype, self.image_store, payloads)

    def _encode(self, env: Any, payloads: list[list], todo: list[list[int]], on_batch: OnBatch | None) -> int:
        """Encode and commit the batches ``todo``; returns the number of items encoded."""
        from tqdm import tqdm

        n_todo = sum(len(b) for b in todo)
        expect = (len(self.layers), self.info.dim)
        runner = self._runner(payloads, todo, n_todo)
        bar = tqdm(total=n_todo, desc=f"cache {self.spec.name}", unit="item", disable=None, leave=False)
        done = 0
        try:
            for k, arr in runner.run(payloads):
                batch = todo[k]
                if arr.shape != (len(batch), *expect):
                    raise CacheError(f"encoder '{self.spec.encoder}' gave states of shape {arr.shape} while "
                                     f"building {self.folder}, expected {(len(batch), *expect)}")
                put_batch(env, [self.tokens[i].encode("utf-8") for i in batch], arr, self.seed)
                done += len(batch)
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(done, n_todo)
        except WorkerDied as exc:
            raise CacheError(f"cache {self.folder}: an encoder worker died ({exc}); {done + len(self.tokens) - n_todo} "
                             f"of {len(self.tokens)} items are stored: run the build again to resume") from None
        finally:
            bar.close()
            runner.close()
        return done


# --------------------------------------------------------------------------------------------
# all towers of a config

def _tower_texts(spec: TowerSpec, cols: Mapping[str, list[str]], tokens: list[str]) -> list[str]:
    """Each item's text for a text tower: its non-empty fields joined by '. '."""
    texts = [". ".join(v for v in (cols[f][i].strip() for f in spec.fields) if v) for i in range(len(tokens))]
    empty = [tokens[i] for i, t in enumerate(texts) if not t]
    if empty:
        logger.warning(f"tower '{spec.name}': {len(empty)} items have an empty {'/'.join(spec.fields)} "
                       f"(first: {empty[:5]}); encoded as the empty string")
    return texts


def ensure_caches(config: Mapping) -> dict[str, Path]:
    """Build or reuse the cache of every tower of ``config`` over every item of the dataset's
    ``.item`` file (independent of RecBole's later filtering). Returns ``{tower: folder}``."""
    names, cols = read_item_file(config)
    specs = tower_specs_for(config, names)
    tokens = cols[item_id_field(config, names)]
    layers = required_layers(config, specs)
    out: dict[str, Path] = {}
    for spec in specs:
        if spec.is_image:
            store = find_image_store(config, tokens, spec.name)
            out[spec.name] = ensure_cache(config, spec, layers[spec.name], tokens, image_store=store)
        else:
            texts = _tower_texts(spec, cols, tokens)
            out[spec.name] = ensure_cache(config, spec, layers[spec.name], tokens, item_texts=texts)
    return out


__all__ = ["ensure_cache", "ensure_caches"]
