"""The data a run needs, prepared and loaded: RecBole's ``recbole/data/utils.py`` for the plugin.

- :func:`prepare_inputs`: everything before a dataset is built, as one step: atomic files (from
  the authors' raw files, or downloaded), then the encoder caches of models that read them (built,
  resumed or reused). A single run, every compared model, every tuning trial and every DDP rank
  goes through here.
- :func:`create_dataset`: the plugin's dataset class for a model (multimodal for IISAN, raw inputs
  for the in-the-loop models, protocol-aware for RecBole's sequential models).
"""
from __future__ import annotations

from logging import getLogger
from pathlib import Path
from typing import Any, Optional

from recbole_iisan.data.dataset import MultimodalSequentialDataset, ProtocolSequentialDataset
from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.utils.files import setting

RAW_PATTERNS = ("am_*_users*.tsv", "*_items.tsv")


def needs_item_states(model_class: type) -> bool:
    """Whether a model trains on the frozen-encoder cache (IISAN) rather than raw inputs or ids."""
    return getattr(model_class, "item_inputs", None) == "states"


def _raw_dir_candidates(config: Any) -> list[Path]:
    root = Path(config["data_path"])
    cands = [Path(p) for p in [setting(config, "raw_dir")] if p] + [root, root / "raw"]
    return cands


def ensure_atomic_files(config: Any) -> None:
    """Make ``<data_path>/<dataset>.inter`` from raw files when only those are there."""
    root = Path(config["data_path"])
    dataset = config["dataset"]
    inter = root / f"{dataset}.inter"
    if inter.is_file():
        return
    for raw in _raw_dir_candidates(config):
        if raw.is_dir() and all(list(raw.glob(p)) for p in RAW_PATTERNS):
            from recbole_iisan.data.atomic_files import prepare_dataset

            getLogger().info(f"preparing {dataset} from raw files in {raw}")
            prepare_dataset(dataset, str(raw), str(root.parent), images=setting(config, "image_dir"))
            return
    from recbole_iisan.data.sources import download_and_prepare, is_known_dataset

    if is_known_dataset(dataset):  # the paper's datasets fetch themselves (RECBOLE_IISAN_DATA_URL)
        download_and_prepare(dataset, root.parent, images=setting(config, "image_dir"))
        return
    raise PluginConfigError(
        f"dataset '{dataset}' not found: expected {inter} (RecBole atomic files) or the raw files "
        f"{' and '.join(RAW_PATTERNS)} in {root} or in --raw_dir; see dataset/README.md"
    )


def create_dataset(config: Any, model_class: type):
    """The plugin's dataset class for this model (multimodal for IISAN, raw inputs for the
    in-the-loop models, protocol-aware for RecBole's sequential models). It only loads: the caches
    it reads are prepared before (:func:`prepare_inputs`)."""
    from recbole.utils import ModelType

    kind = getattr(model_class, "item_inputs", None)
    if kind == "states":
        return MultimodalSequentialDataset(config)
    if kind == "raw":
        from recbole_iisan.data.raw_inputs import RawInputSequentialDataset

        return RawInputSequentialDataset(config)
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL:
        return ProtocolSequentialDataset(config)
    return recbole_dataset(config)


def recbole_dataset(config: Any):
    """RecBole's ``create_dataset`` without its ``pickle.load`` of a saved dataset
    (``dataset_save_path``, or ``<checkpoint_dir>/<dataset>-<class>.pth`` whenever it exists: a
    pickle can run code): the same dataset class, built from the atomic files."""
    import importlib

    from recbole.utils import ModelType

    module = importlib.import_module("recbole.data.dataset")
    by_type = {ModelType.SEQUENTIAL: "SequentialDataset", ModelType.KNOWLEDGE: "KnowledgeBasedDataset"}
    name = config["model"] + "Dataset"
    if hasattr(module, name):
        dataset_class = getattr(module, name)
    else:
        dataset_class = getattr(module, by_type.get(config["MODEL_TYPE"], "Dataset"))
    dataset = dataset_class(config)
    if config["save_dataset"]:
        dataset.save()
    return dataset


def prepare_inputs(config: Any, model_class: Optional[type] = None) -> dict[str, str]:
    """Everything a run needs before a dataset is built, as one step: atomic files, then the
    encoder caches of models that read them (built, resumed or reused). A single run, every
    compared model, every tuning trial and every DDP rank goes through here; the parent of
    ``--compare`` / ``--tune`` / DDP calls it first, so the children only find the caches.
    Sets ``config["item_state_caches"]`` ({tower: folder}) for the dataset; returns it."""
    if model_class is None:
        from recbole_iisan.config.configurator import get_model_class

        model_class = get_model_class(config["model"])
    ensure_atomic_files(config)
    caches: dict[str, str] = {}
    if needs_item_states(model_class):
        from recbole_iisan.data.cache.build import ensure_caches

        from recbole_iisan.utils.errors import disk_full_guard

        with disk_full_guard(lambda: _cache_folder(config)):  # a full disk while building: one line
            caches = {t: str(p) for t, p in ensure_caches(config).items()}
        config["item_state_caches"] = caches
    return caches


def _cache_folder(config: Any) -> str:
    """Where the preparation step writes: the encoder cache folder."""
    from recbole_iisan.data.cache.paths import cache_root

    return str(cache_root(config))
