"""Where a config's caches live and what they are built from: the dataset folder, the cache
folder, the items of ``<dataset>.item``, the image store, the towers and the hidden states each
tower's cache holds."""
from __future__ import annotations

import csv
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from recbole_iisan.towers import encoders as _enc
from recbole_iisan.towers.layer_select import tower_layers_from_config
from recbole_iisan.towers.spec import TowerSpec, tower_specs
from recbole_iisan.utils.errors import CacheError
from recbole_iisan.utils.files import setting

logger = logging.getLogger("recbole_iisan.cache")


# --------------------------------------------------------------------------------------------
# where

def dataset_dir(config: Mapping) -> Path:
    """The dataset's folder. RecBole's Config already appends the dataset name to ``data_path``;
    a plain dict (build_cache) does not: both work."""
    dataset = str(setting(config, "dataset") or "")
    if not dataset:
        raise CacheError("config key 'dataset' is not set")
    base = Path(os.path.expanduser(str(setting(config, "data_path"))))
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
    explicit = setting(config, "cache_dir")
    if explicit:
        root = Path(os.path.expanduser(str(explicit)))
        if str(setting(config, "cache_rebuild")) == "never" and root.is_dir():
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
    fallback = user_data_dir(str(setting(config, "dataset")))
    if not _writable(fallback):
        raise CacheError(f"neither {default} nor {fallback} is writable: set config key 'cache_dir'")
    why = "inside an installed package" if in_package else "not writable"
    logger.info(f"cache folder: {fallback} ({default} is {why})")
    return fallback


# --------------------------------------------------------------------------------------------
# the items

def read_item_file(config: Mapping) -> tuple[list[str], dict[str, list[str]]]:
    """``(field names, {field: values})`` of ``<dataset>.item`` (all strings, file order)."""
    path = dataset_dir(config) / f"{setting(config, 'dataset')}.item"
    if not path.is_file():
        raise CacheError(f"no item file {path}: run prepare for dataset '{setting(config, 'dataset')}' "
                         f"or set data_path")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise CacheError(f"{path} is empty")
    names = [h.split(":")[0] for h in rows[0]]
    cols: dict[str, list[str]] = {n: [] for n in names}
    for row in rows[1:]:
        if not row:
            continue
        if len(row) < len(names):
            row = row + [""] * (len(names) - len(row))
        for n, v in zip(names, row):
            cols[n].append(v)
    return names, cols


def item_id_field(config: Mapping, names: Sequence[str]) -> str:
    """The item file's column of item tokens (``ITEM_ID_FIELD``)."""
    field = str(setting(config, "ITEM_ID_FIELD"))
    if field not in names:
        raise CacheError(f"config key 'ITEM_ID_FIELD': {field!r} is not a column of the item file "
                         f"(it has {list(names)})")
    return field


def find_image_store(config: Mapping, tokens: Sequence[str], tower: str) -> Any:
    """The dataset's image store (``data/images``), first brought up to date with ``image_dir``
    when that is set."""
    try:
        from recbole_iisan.data import images as _img
    except ImportError as exc:
        raise CacheError(f"tower '{tower}' needs recbole_iisan.data.images ({exc})") from None
    ds_dir = dataset_dir(config)
    dataset = str(setting(config, "dataset"))
    store_path = Path(_img.default_image_store_path(ds_dir.parent, dataset))
    image_dir = setting(config, "image_dir")
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


# --------------------------------------------------------------------------------------------
# the towers and their layers

def tower_specs_for(config: Mapping, names: Sequence[str] | None = None) -> list[TowerSpec]:
    """The config's towers, validated against the columns of the dataset's item file (``names``,
    read from the file when not given)."""
    if names is None:
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
    if str(setting(config, "cache_layers") or "").lower() == "all":
        infos = {s.name: _enc.encoder_info(s.encoder, s.name) for s in specs}
        return {t: list(range(i.n_layers + 1)) for t, i in infos.items()}
    return model_layers(config, specs)


__all__ = ["cache_root", "dataset_dir", "encoder_depth", "find_image_store", "item_id_field", "model_layers",
           "read_item_file", "required_layers", "tower_specs_for"]
