"""One run, from a dataset name to test metrics, for plugin and RecBole models alike.

``run()`` is what ``run_recbole_iisan.py`` calls: config -> prepare (raw files -> atomic files,
if needed) -> encoder cache (plugin models that read cached states) -> RecBole dataset and split
-> model -> RecBole Trainer (``PluginTrainer``) -> test evaluation -> result dict (+ JSON file).
RecBole's own ``run_recbole`` cannot do this: it rebuilds models by built-in name only.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from logging import getLogger
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from recbole.data import data_preparation
from recbole.utils import init_logger, init_seed, set_color

from recbole_iisan.config.configurator import build_config, get_model_class
from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.data.utils import create_dataset, prepare_inputs
from recbole_iisan.quick_start.results import format_gates, write_result
from recbole_iisan.utils.resources import peak_memory, trainable_parameters
from recbole_iisan.trainer.trainer import PluginTrainer
from recbole_iisan.utils.files import setting


def count_train_targets(model: torch.nn.Module, train_dataset: Any) -> int:
    """Loss targets per epoch: every position of every training window for a model whose loss
    reads every position (IISAN, ``loss_positions: all``), else one per training row (RecBole's
    sequential models, whose loss reads the last position of each augmented prefix). Equal counts
    mean equal supervision: the same (user, position, target) triples."""
    if getattr(model, "loss_positions", "last") == "all":
        return int(train_dataset.inter_feat[model.ITEM_SEQ_LEN].sum())
    return len(train_dataset)


def config_digest(config: Any) -> str:
    """A short digest of the settings that change results (for the result file)."""
    items = {k: repr(v) for k, v in sorted(config.final_config_dict.items())
             if k not in {"device", "gpu_id", "checkpoint_dir", "log_wandb", "show_progress", "state"}}
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def run(
    model: str,
    dataset: str,
    config_files: Optional[list[str]] = None,
    config_dict: Optional[dict] = None,
    overrides: Optional[dict] = None,
    saved: bool = True,
    resume: Optional[str] = None,
    result_file: Optional[str] = None,
    callback_fn: Optional[Callable[[int, float], None]] = None,
    evaluate_test: bool = True,
    queue: Any = None,
    checkpoint_file: Optional[str] = None,
    last_checkpoint_file: Optional[str] = None,
    label: Optional[str] = None,
) -> dict:
    """Train ``model`` on ``dataset`` and evaluate it; returns (and writes) the result dict.

    The pipeline: config -> :func:`prepare_inputs` (atomic files, encoder caches) -> dataset and
    split -> model -> :class:`PluginTrainer` -> test at the best validation epoch -> result file
    (JSON) and, beside it, each test user's metrics (``<result>.users.csv``,
    :mod:`recbole_iisan.evaluator.per_user`).

    ``checkpoint_file`` names the best model's file (default: RecBole's ``<Model>-<time>``, ``.safetensors``);
    with ``last_checkpoint_file`` the whole training state is saved there after every validation,
    and ``resume`` given that file continues the run exactly where it stopped."""
    config = build_config(model, dataset, config_files, config_dict, overrides)
    _start(config)
    model_class = get_model_class(model)
    train_data, valid_data, test_data = load_data(config, model_class)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    net = model_class(config, train_data._dataset).to(config["device"])
    getLogger().info(net)
    trainer = PluginTrainer(config, net, checkpoint_file=checkpoint_file, last_checkpoint_file=last_checkpoint_file)
    if resume:
        _resume(trainer, resume, train_data)
    outcome = _fit_and_test(trainer, train_data, valid_data, test_data, saved, evaluate_test, callback_fn)
    result = result_record(config, net, trainer, train_data, outcome, label)
    if outcome["test_result"] is not None and config["single_spec"]:  # Hit/NDCG by target frequency, repeat, length
        from recbole_iisan.evaluator.breakdown import compute as compute_breakdown

        result["breakdown"] = compute_breakdown(trainer, train_data, test_data)
    _log_summary(config, result, trainer)
    result["result_file"] = _write_outputs(config, result, outcome["per_user"], test_data, result_file)
    if queue is not None and config["local_rank"] == 0:
        queue.put(result)
    return result


def _start(config: Any) -> None:
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)
    if config["paper_protocol"]:
        logger.info(set_color("paper protocol", "yellow") + ": last 13 items per user, every position of the "
                    f"user's window trained, mask_history {config['mask_history']}, selection on "
                    f"{config['valid_metric']} ({config['selection_rule']} rule), batch {config['train_batch_size']}")


def load_data(config: Any, model_class: type) -> tuple:
    """Inputs prepared (:func:`prepare_inputs`), the plugin's dataset for this model, cold-start
    items held out (``cold_start_items``), then RecBole's split: ``(train, valid, test)`` loaders."""
    from recbole_iisan.evaluator.cold_start import apply as cold_start

    prepare_inputs(config, model_class)
    ds = cold_start(config, create_dataset(config, model_class))
    getLogger().info(ds)
    return data_preparation(config, ds)


def _resume(trainer: PluginTrainer, resume: str, train_data: Any) -> None:
    """A rolling last state (exact continuation) or a checkpoint (continue after its epoch)."""
    from recbole_iisan.trainer import checkpoint

    if checkpoint.is_last_checkpoint(resume, trust=checkpoint.trusted(trainer.config)):
        checkpoint.resume_last(trainer, resume, train_data)
    else:
        trainer.resume_checkpoint(resume)


def _fit_and_test(trainer: PluginTrainer, train_data, valid_data, test_data, saved: bool, evaluate_test: bool,
                  callback_fn) -> dict:
    """Train with early stopping, then test the best validation epoch's model; timings and each
    test user's metrics."""
    config = trainer.config
    if config["device"].type == "cuda":
        torch.cuda.reset_peak_memory_stats(config["device"])
    t0 = time.perf_counter()
    best_score, best_result = trainer.fit(train_data, valid_data, saved=saved, show_progress=config["show_progress"],
                                          callback_fn=callback_fn)
    out = {"best_valid_score": best_score, "best_valid_result": best_result, "fit_seconds": time.perf_counter() - t0,
           "test_result": None, "test_seconds": None, "per_user": {}, "saved": saved}
    if evaluate_test:
        if saved and not config["single_spec"]:
            from recbole_iisan.utils.compat import sync_checkpoint_path

            sync_checkpoint_path(trainer)  # DDP: every rank loads the file rank 0 wrote
        t1 = time.perf_counter()
        out["test_result"] = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
        out["test_seconds"] = time.perf_counter() - t1
        out["per_user"] = dict(trainer.evaluator.per_user)
    return out


def _mean(xs: list[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


def result_record(config: Any, net: torch.nn.Module, trainer: PluginTrainer, train_data: Any, outcome: dict,
                  label: Optional[str] = None) -> dict:
    """The result file's content: what ran (model, protocol, settings, supervision), how it went
    (per-epoch history, best epoch, convergence) and what it measured (metrics, time, memory)."""
    encoder = getattr(net, "user_encoder", None)
    test = outcome["test_result"]
    best = outcome["best_valid_score"]
    return {
        "model": config["model"], "label": label or config["model"], "dataset": config["dataset"],
        "config_digest": config_digest(config), "paper_protocol": bool(config["paper_protocol"]),
        "protocol": "paper" if config["paper_protocol"] else "recbole", "mask_history": bool(config["mask_history"]),
        "selection_metric": config["valid_metric"], "train_samples": len(train_data._dataset),
        "train_targets": count_train_targets(net, train_data._dataset),
        "train_batch_size": int(config["train_batch_size"]), "selection_rule": config["selection_rule"],
        "user_encoder": encoder if isinstance(encoder, str) else None, "seed": config["seed"],
        "device": str(config["device"]), "trainable_parameters": trainable_parameters(net),
        "best_valid_score": float(best) if best is not None else None, "valid_metric": config["valid_metric"],
        "metrics": list(config["metrics"]), "topk": list(config["topk"]),
        "best_valid_result": {k: float(v) for k, v in (outcome["best_valid_result"] or {}).items()},
        "test_result": {k: float(v) for k, v in test.items()} if test else None,
        "epochs_run": len(trainer.train_epoch_seconds), "epochs": int(config["epochs"]),
        "stopping_step": int(config["stopping_step"]), "best_epoch": trainer.best_epoch + 1,
        "converged": trainer.converged, "valid_scores": list(trainer.valid_scores),
        "train_losses": [float(trainer.train_loss_dict[k]) for k in sorted(trainer.train_loss_dict)],
        "torch_threads": torch.get_num_threads(),
        "train_seconds_per_epoch": _mean(trainer.train_epoch_seconds), "eval_seconds_per_pass": _mean(trainer.eval_seconds),
        "test_seconds": outcome["test_seconds"], "fit_seconds": outcome["fit_seconds"],
        "peak_memory": peak_memory(config["device"]),
        "checkpoint": trainer.saved_model_file if outcome.get("saved", True) else None,
    }


def _log_summary(config: Any, result: dict, trainer: PluginTrainer) -> None:
    logger = getLogger()
    gates = trainer.model.gate_values() if hasattr(trainer.model, "gate_values") else {}
    if gates:
        result["gate_values"] = gates
        logger.info(set_color("gate values (best epoch)", "blue") + f": {format_gates(gates)}")
    logger.info(set_color("best valid ", "yellow") + f": {result['best_valid_result']}")
    if result["test_result"] is not None:
        logger.info(set_color("test result", "yellow") + f": {result['test_result']}")
    if not trainer.converged:
        logger.warning(f"{config['model']} (seed {config['seed']}): still improving at the epoch cap: best epoch "
                       f"{result['best_epoch']} of {config['epochs']}, within stopping_step {config['stopping_step']} "
                       f"of the cap: raise --epochs")


def _write_outputs(config: Any, result: dict, per_user: dict, test_data: Any, result_file: Optional[str]) -> str:
    """The result JSON (rank 0) and, beside it, each test user's metrics (one process)."""
    path = result_file or os.path.join("saved", f"{config['model']}-{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    if result["test_result"] is not None and config["single_spec"] and per_user:
        from recbole_iisan.evaluator import per_user as per_user_mod

        result["per_user_file"] = os.path.basename(per_user_mod.path_for(path))
        per_user_mod.write(per_user_mod.path_for(path), per_user_mod.test_user_tokens(test_data), per_user)
    if config["local_rank"] == 0:  # DDP: one result file, written by rank 0
        write_result(path, result)
        getLogger().info(f"result written to {path}")
    return path


def _run_rank(rank: int, model: str, dataset: str, config_files, kwargs: dict) -> None:
    kwargs = dict(kwargs)
    kwargs["config_dict"] = dict(kwargs.get("config_dict") or {}, local_rank=rank)
    import gc

    import torch.distributed as dist

    try:
        run(model, dataset, config_files, **kwargs)
        # the process group goes last: after the DDP model, its reducer and the loaders are freed and
        # every rank is done (a gloo group torn down under live work can abort the process at exit)
        gc.collect()
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(model: str, dataset: str, config_files: Optional[list[str]] = None,
                    config_dict: Optional[dict] = None, overrides: Optional[dict] = None, nproc: int = 1,
                    world_size: int = -1, ip: str = "localhost", port: str = "5678", group_offset: int = 0,
                    **kwargs: Any) -> Optional[dict]:
    """RecBole's DDP mode (as ``run_recbole.py --nproc``) for plugin models too; the inputs are
    prepared once here, before the ranks start."""
    import torch.multiprocessing as mp

    prepare_inputs(build_config(model, dataset, config_files, config_dict, overrides))
    world_size = nproc if world_size == -1 else world_size
    queue = mp.get_context("spawn").SimpleQueue()
    cd = dict(config_dict or {})
    cd.update({"world_size": world_size, "ip": ip, "port": port, "nproc": nproc, "offset": group_offset})
    cd.setdefault("cache_rebuild", "never")  # the ranks only read the cache prepare_inputs built
    kwargs.update({"config_dict": cd, "overrides": overrides, "queue": queue})
    mp.spawn(_run_rank, args=(model, dataset, config_files, kwargs), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


