"""One run, from a dataset name to test metrics, for plugin and RecBole models alike.

``run()`` is what ``run_recbole_iisan.py`` calls: config -> prepare (raw files -> atomic files,
if needed) -> encoder cache (plugin models that read cached states) -> RecBole dataset and split
-> model -> RecBole Trainer (``PluginTrainer``) -> test evaluation -> result dict (+ JSON file).
RecBole's own ``run_recbole`` cannot do this: it rebuilds models by built-in name only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import sys
import time
from logging import getLogger
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from recbole.data import data_preparation
from recbole.utils import init_logger, init_seed, set_color

from recbole_iisan.config import PluginConfigError, build_config, get_model_class
from recbole_iisan.data.dataset import MultimodalSequentialDataset, ProtocolSequentialDataset
from recbole_iisan.trainer import PluginTrainer
from recbole_iisan.utils import config_get as _get

RAW_PATTERNS = ("am_*_users*.tsv", "*_items.tsv")




def needs_item_states(model_class: type) -> bool:
    """Whether a model trains on the frozen-encoder cache (IISAN) or not (RecBole models)."""
    return bool(getattr(model_class, "needs_item_states", False))


def _raw_dir_candidates(config: Any) -> list[Path]:
    root = Path(config["data_path"])
    cands = [Path(p) for p in [_get(config, "raw_dir")] if p] + [root, root / "raw"]
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
            from recbole_iisan.data.prepare import prepare_dataset

            getLogger().info(f"preparing {dataset} from raw files in {raw}")
            prepare_dataset(dataset, str(raw), str(root.parent), images=_get(config, "image_dir"))
            return
    raise PluginConfigError(
        f"dataset '{dataset}' not found: expected {inter} (RecBole atomic files) or the raw files "
        f"{' and '.join(RAW_PATTERNS)} in {root} or in --raw_dir; see dataset/README.md"
    )


def create_dataset(config: Any, model_class: type):
    """The plugin's dataset class for this model (multimodal for IISAN, protocol-aware otherwise)."""
    from recbole.utils import ModelType

    if needs_item_states(model_class):
        return MultimodalSequentialDataset(config)
    if getattr(model_class, "needs_raw_inputs", False):
        from recbole_iisan.data.raw_inputs import RawInputSequentialDataset

        return RawInputSequentialDataset(config)
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL:
        return ProtocolSequentialDataset(config)
    from recbole.data import create_dataset as rb_create_dataset

    return rb_create_dataset(config)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_memory_bytes(device: torch.device) -> dict[str, int]:
    """CUDA max allocated / reserved on GPU; process peak RSS on CPU (Linux ru_maxrss is KiB)."""
    out = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
        out["cuda_max_reserved"] = torch.cuda.max_memory_reserved(device)
    return out


def config_digest(config: Any) -> str:
    """A short digest of the settings that change results (for the result file)."""
    items = {k: repr(v) for k, v in sorted(config.final_config_dict.items())
             if k not in {"device", "gpu_id", "checkpoint_dir", "log_wandb", "show_progress", "state"}}
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def _trainer_for(config: Any, model: torch.nn.Module) -> PluginTrainer:
    cls = getattr(type(model), "trainer_class", None) or PluginTrainer
    return cls(config, model)


def run(
    model: str,
    dataset: str,
    config_files: Optional[list[str]] = None,
    config_dict: Optional[dict] = None,
    saved: bool = True,
    resume: Optional[str] = None,
    result_file: Optional[str] = None,
    callback_fn: Optional[Callable[[int, float], None]] = None,
    evaluate_test: bool = True,
    queue: Any = None,
) -> dict:
    """Train ``model`` on ``dataset`` and evaluate it; returns (and writes) the result dict."""
    config = build_config(model, dataset, config_files, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)
    model_class = get_model_class(model)
    if _get(config, "paper_protocol", False):
        logger.info(set_color("paper protocol", "yellow") + ": last 13 items per user, history masked at ranking")

    ensure_atomic_files(config)
    ds = create_dataset(config, model_class)
    logger.info(ds)
    train_data, valid_data, test_data = data_preparation(config, ds)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    net = model_class(config, train_data._dataset).to(config["device"])
    logger.info(net)
    n_trainable = trainable_parameters(net)
    logger.info(set_color("trainable parameters", "blue") + f": {n_trainable:,}")

    trainer = _trainer_for(config, net)
    if resume:
        trainer.resume_checkpoint(resume)
    if config["device"].type == "cuda":
        torch.cuda.reset_peak_memory_stats(config["device"])
    t0 = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"], callback_fn=callback_fn
    )
    fit_seconds = time.perf_counter() - t0
    test_result = None
    test_seconds = None
    if evaluate_test:
        if saved and not config["single_spec"]:
            from recbole_iisan.compat import sync_checkpoint_path

            sync_checkpoint_path(trainer)  # DDP: every rank loads the file rank 0 wrote
        t1 = time.perf_counter()
        test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
        test_seconds = time.perf_counter() - t1
    mem = peak_memory_bytes(config["device"])

    epochs = trainer.train_epoch_seconds
    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "config_digest": config_digest(config),
        "paper_protocol": bool(_get(config, "paper_protocol", False)),
        "seed": config["seed"],
        "device": str(config["device"]),
        "trainable_parameters": n_trainable,
        "best_valid_score": float(best_valid_score) if best_valid_score is not None else None,
        "valid_metric": config["valid_metric"],
        "best_valid_result": {k: float(v) for k, v in (best_valid_result or {}).items()},
        "test_result": {k: float(v) for k, v in (test_result or {}).items()} if test_result else None,
        "epochs_run": len(epochs),
        "best_epoch": trainer.best_epoch + 1,
        "train_seconds_per_epoch": float(sum(epochs) / len(epochs)) if epochs else None,
        "eval_seconds_per_pass": float(sum(trainer.eval_seconds) / len(trainer.eval_seconds)) if trainer.eval_seconds else None,
        "test_seconds": test_seconds,
        "fit_seconds": fit_seconds,
        "peak_memory": mem,
        "checkpoint": trainer.saved_model_file if saved else None,
    }
    if hasattr(net, "gate_values"):
        result["gate_values"] = net.gate_values()
        logger.info(set_color("gate values (best epoch)", "blue") + f": {format_gates(result['gate_values'])}")
    logger.info(set_color("best valid ", "yellow") + f": {result['best_valid_result']}")
    if test_result is not None:
        logger.info(set_color("test result", "yellow") + f": {result['test_result']}")
    path = result_file or os.path.join("saved", f"{config['model']}-{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    if config["local_rank"] == 0:  # DDP: one result file, written by rank 0
        write_json(path, result)
        logger.info(f"result written to {path}")
    result["result_file"] = path
    if not config["single_spec"]:
        import torch.distributed as dist

        dist.destroy_process_group()
    if queue is not None and config["local_rank"] == 0:
        queue.put(result)
    return result


def prepare_inputs(model: str, dataset: str, config_files: Optional[list[str]] = None,
                   config_dict: Optional[dict] = None) -> None:
    """Everything a run needs before training, done once: atomic files and the encoder cache.

    ``--compare``, ``--tune`` and multi-process runs call this first, so no trial, rank or
    compared model ever builds (or races to build) the cache.
    """
    config = build_config(model, dataset, config_files, config_dict)
    init_logger(config)
    ensure_atomic_files(config)
    if needs_item_states(get_model_class(model)):
        from recbole_iisan.data.cache import ensure_caches

        ensure_caches(config)


def _run_rank(rank: int, model: str, dataset: str, config_files, kwargs: dict) -> None:
    kwargs = dict(kwargs)
    kwargs["config_dict"] = dict(kwargs.get("config_dict") or {}, local_rank=rank)
    run(model, dataset, config_files, **kwargs)


def run_distributed(model: str, dataset: str, config_files: Optional[list[str]] = None,
                    config_dict: Optional[dict] = None, nproc: int = 1, world_size: int = -1,
                    ip: str = "localhost", port: str = "5678", group_offset: int = 0, **kwargs: Any) -> Optional[dict]:
    """RecBole's DDP mode (as ``run_recbole.py --nproc``) for plugin models too."""
    import torch.multiprocessing as mp

    prepare_inputs(model, dataset, config_files, config_dict)
    world_size = nproc if world_size == -1 else world_size
    queue = mp.get_context("spawn").SimpleQueue()
    cd = dict(config_dict or {})
    cd.update({"world_size": world_size, "ip": ip, "port": port, "nproc": nproc, "offset": group_offset})
    cd.setdefault("cache_rebuild", "never")  # the ranks only read the cache prepare_inputs built
    kwargs.update({"config_dict": cd, "queue": queue})
    mp.spawn(_run_rank, args=(model, dataset, config_files, kwargs), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def format_gates(gates: dict) -> str:
    return "; ".join(f"{k}: " + ", ".join(f"{v:.3f}" for v in vals) for k, vals in gates.items())


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, p)
