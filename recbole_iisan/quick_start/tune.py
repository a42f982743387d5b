"""``--tune=hyper.test``: a Ray Tune search over plugin (IISANVS / IISANVA) and RecBole models.

    python run_recbole_iisan.py --model=IISANVS --dataset=Scientific --tune=hyper.test \\
        [--num_samples=8] [--search_alg=random|hyperopt|optuna] [--max_concurrent=N] \\
        [--cpus_per_trial=1] [--gpus_per_trial=0.25] [--ray_address=auto] \\
        [--storage_path=ray_results] [--tune_name=NAME] [--resume] [--key=value ...]

How it works (Ray Tune >= 2.45, its current API: ``tune.Tuner``, ``tune.RunConfig(storage_path=...)``,
``tune.report(dict)`` after every epoch, ASHA, ``tune.Tuner.restore``; RecBole's own ``run_hyper.py``
and its ``ray<=2.6.3`` are not used, see docs/installation.md):

* ``hyper.test`` is read in RecBole's format (``name type values``; ``choice``, ``uniform``,
  ``loguniform`` with RecBole's natural-log bounds, ``quniform``) into a Ray Tune search space.
* The driver prepares the data and builds the encoder cache ONCE (``recbole_iisan.data.utils.prepare_inputs``,
  once per cache-relevant choice such as ``layer_scheme``, so the cache holds every layer any
  trial reads). Trials get ``cache_rebuild: never`` and absolute ``data_path`` / ``cache_dir``:
  they only read it, and trials on other nodes of a cluster read the same shared folder.
* Each trial is ``quick_start.run`` with the fixed overrides + its sampled parameters, run in its
  trial folder under ``<storage_path>/<name>/`` (``tune.get_context().get_trial_dir()``: RecBole's
  log, checkpoint and result file land there, on the shared storage of a cluster); it reports
  the VALIDATION metric (``valid_metric``, e.g. ``ndcg@10``) with ``tune.report`` after every evaluation
  (``{metric, 'epoch'}``), so ASHA can stop poor trials early. A trial that finishes reports once
  more with its best validation score and its test metrics (without ``epoch``, which ASHA ignores).
  Selection is on validation only; the test metrics of the best trial are only printed.
* A failed trial is reported with its error; the others go on. ``--resume`` continues an
  interrupted search from ``<storage_path>/<name>``.
* At the end: a markdown table of the trials (+ CSV), the best trial's validation and test
  metrics, and ``<storage_path>/<name>/best_config.yaml`` for ``--config_files``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from logging import getLogger
from pathlib import Path
from typing import Any, Optional, Sequence

from recbole_iisan.trainer.hyper_tuning import (FINAL_KEY, RESULT_FILE, STATUS_INTERRUPTED, STATUS_STOPPED,
                                               CACHE_KEYS, NO_ABSOLUTE_KEYS, PATH_KEY_SUFFIXES, HyperParam,
                                               _fmt, _node_id, _ray_init, _search_alg, _storage_trial_dir,
                                               _trial_id, _trial_rows, native, parse_hyper_file, search_space,
                                               trial_states, write_best_config)
from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.utils.tables import markdown_table, write_csv

def absolute_paths(config: Any, fixed: dict) -> dict:
    """Config values naming existing relative files or folders -> absolute (trials chdir)."""
    out = {}
    keys = set(fixed) | set(getattr(config, "final_config_dict", {}) or {})
    for key in keys:
        if key in NO_ABSOLUTE_KEYS or not key.endswith(PATH_KEY_SUFFIXES):
            continue
        value = fixed[key] if key in fixed else config[key]
        if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(value):
            out[key] = os.path.abspath(value)
    return out


def trial_config_dict(fixed: dict, params: dict, base_iisan_lr: Optional[dict] = None,
                      int_keys: Sequence[str] = ()) -> dict:
    """What a trial passes to ``quick_start.run``: fixed overrides, then the sampled parameters.

    IISAN reads the recommender's lr from ``iisan_lr['recsys']`` when present (its yaml sets it),
    so a tuned ``learning_rate`` is also written there, or tuning it would change nothing.
    """
    d = dict(fixed)
    d.update({k: native(v) for k, v in params.items()})
    for k in int_keys:
        if isinstance(d.get(k), float):
            d[k] = int(round(d[k]))
    if "learning_rate" in params and base_iisan_lr and "recsys" in base_iisan_lr:
        d["iisan_lr"] = dict(base_iisan_lr, recsys=native(params["learning_rate"]))
    d["show_progress"] = False
    return d


def tune_trainable(config: dict, model: str = "", dataset: str = "", config_files: Optional[list] = None,
                   fixed: Optional[dict] = None, metric: str = "ndcg@10", base_iisan_lr: Optional[dict] = None,
                   gpus_per_trial: float = 0.0, cpus_per_trial: float = 1.0, max_t: int = 0,
                   int_keys: Sequence[str] = ()) -> None:
    """One Ray Tune trial: train with the sampled ``config``, report validation after each
    evaluation, then the final summary (best validation score + test metrics)."""
    import torch
    from ray import tune

    import recbole_iisan  # noqa: F401  (compat shims in the worker)
    from recbole_iisan.quick_start import pipeline as quick_start

    cd = trial_config_dict(fixed or {}, config, base_iisan_lr, int_keys)
    if gpus_per_trial > 0:
        import ray

        # Ray put this trial's GPUs in CUDA_VISIBLE_DEVICES; RecBole overwrites it with gpu_id
        cd["gpu_id"] = ",".join(str(int(float(g))) for g in ray.get_gpu_ids()) or os.environ.get("CUDA_VISIBLE_DEVICES", "")
        cd["use_gpu"] = bool(cd["gpu_id"])
    else:
        cd["gpu_id"] = ""
        cd["use_gpu"] = False
    torch.set_num_threads(max(1, int(cpus_per_trial)))

    epoch_seen = {"n": 0}
    last_epoch = int(cd.get("epochs") or max_t or 0)

    def report(epoch_idx: int, valid_score: float) -> None:
        epoch_seen["n"] = epoch_idx + 1
        if last_epoch and epoch_idx + 1 >= last_epoch:
            # ASHA stops any trial that reports epoch == max_t; this one is done anyway: its test
            # evaluation and final report (below) come next
            return
        tune.report({metric: float(valid_score), "epoch": epoch_idx + 1})

    trial_dir = _storage_trial_dir()
    os.makedirs(trial_dir, exist_ok=True)
    os.chdir(trial_dir)
    result = quick_start.run(model, dataset, config_files, cd, saved=True, evaluate_test=True,
                             result_file=os.path.join(trial_dir, RESULT_FILE), callback_fn=report)
    final = {
        metric: float(result["best_valid_score"]) if result.get("best_valid_score") is not None else float("nan"),
        FINAL_KEY: True,
        "epochs_run": int(result.get("epochs_run") or epoch_seen["n"]),
        "best_epoch": result.get("best_epoch"),
        "best_valid_result": json.dumps(result.get("best_valid_result") or {}),
        "test_result": json.dumps(result.get("test_result") or {}),
        "train_seconds_per_epoch": result.get("train_seconds_per_epoch"),
        "trainable_parameters": result.get("trainable_parameters"),
        "checkpoint": result.get("checkpoint") and os.path.abspath(result["checkpoint"]),
        "result_file": os.path.abspath(result.get("result_file") or RESULT_FILE),
        "node_id": _node_id(),  # which node of the cluster ran the trial
    }
    tune.report(final)


def _prepare_all(model: str, dataset: str, config_files, config_dict: dict, params: Sequence[HyperParam]) -> None:
    """Data + encoder cache once, for every cache-relevant value the search can sample."""
    from recbole_iisan.data.utils import prepare_inputs
    from recbole_iisan.config.configurator import build_config

    choices = [(hp.name, hp.values) for hp in params if hp.name in CACHE_KEYS and hp.kind == "choice"]
    if not choices:
        prepare_inputs(build_config(model, dataset, config_files, config_dict))
        return
    names = [n for n, _ in choices]
    # widest first ('all' layers), so the later ones reuse it instead of growing the cache
    combos = list(itertools.product(*[sorted(v, key=lambda x: x != "all" and x is not False) for _, v in choices]))
    for combo in combos:
        extra = dict(zip(names, combo))
        getLogger().info(f"preparing inputs for {extra}")
        prepare_inputs(build_config(model, dataset, config_files, dict(config_dict, **extra)))


@dataclass
class SearchPlan:
    """Everything a search needs, fixed before Ray starts: the space, the metric and budget, the
    trials' fixed config (absolute paths, the prepared cache read-only) and where it is kept."""

    model: str
    dataset: str
    hyper_file: str
    params: list
    user: dict
    config_files: Optional[list]
    metric: str
    max_t: int
    eval_step: int
    seed: Any
    exp_dir: Path
    fixed: dict
    base_iisan_lr: Optional[dict] = None
    tuned: list = field(default_factory=list)
    int_keys: list = field(default_factory=list)


def plan_search(model: str, dataset: str, hyper_file: str, config_files, config_dict, overrides,
                storage_path: str, tune_name: Optional[str], resume: bool) -> SearchPlan:
    """Read and check the search space and the config (one line on any problem, before Ray)."""
    from recbole_iisan.config.checks import check_search_space
    from recbole_iisan.config.configurator import build_config, get_model_class
    from recbole_iisan.data.utils import needs_item_states

    params = parse_hyper_file(hyper_file)
    get_model_class(model)  # unknown names fail before anything starts
    config_files = [os.path.abspath(f) for f in config_files] if config_files else None
    user = {**(config_dict or {}), **(overrides or {})}
    tuned = [hp.name for hp in params]
    clash = sorted(set(tuned) & set(user))
    if clash:
        getLogger().warning(f"{clash} are given on the command line and in {hyper_file}: the sampled values win")
    if "epochs" in tuned:
        raise PluginConfigError(f"{hyper_file}: 'epochs' cannot be tuned (ASHA's budget): set --epochs")
    config = build_config(model, dataset, config_files, user)
    check_search_space(params, config, hyper_file)  # every value the space can sample, before Ray starts
    exp_dir = Path(os.path.abspath(os.path.expanduser(storage_path))) / (tune_name or f"{model}-{dataset}")
    if not resume and exp_dir.exists() and any(exp_dir.glob("experiment_state*.json")):
        raise PluginConfigError(f"the search {exp_dir} exists: add --resume to continue it, or choose "
                                f"another --tune_name / --storage_path")
    fixed = dict(user, data_path=str(Path(config["data_path"]).resolve().parent), cache_rebuild="never")
    fixed.update(absolute_paths(config, user))
    base_iisan_lr = None
    if needs_item_states(get_model_class(model)):
        from recbole_iisan.data.cache.paths import cache_root

        fixed["cache_dir"] = str(Path(cache_root(config)).resolve())
        lr = config["iisan_lr"]
        base_iisan_lr = dict(lr) if isinstance(lr, dict) else None
    return SearchPlan(model, dataset, hyper_file, params, user, config_files, str(config["valid_metric"]).lower(),
                      int(config["epochs"]), int(config["eval_step"] or 1), config["seed"], exp_dir, fixed,
                      base_iisan_lr, tuned, [hp.name for hp in params if hp.is_int])


def _tuner(plan: SearchPlan, trainable, resume: bool, num_samples: int, search_alg: str, max_concurrent: int, out):
    """A new ``tune.Tuner`` (ASHA on ``epoch``, the search algorithm) or one restored from disk."""
    from ray import tune
    from ray.tune import FailureConfig, RunConfig
    from ray.tune.schedulers import ASHAScheduler

    if resume:
        if not tune.Tuner.can_restore(str(plan.exp_dir)):
            raise PluginConfigError(f"--resume: no search to resume in {plan.exp_dir} "
                                    f"(check --storage_path and --tune_name)")
        print(f"resuming the search from {plan.exp_dir}", file=out, flush=True)
        getLogger().info(f"resuming the search from {plan.exp_dir}")
        return tune.Tuner.restore(str(plan.exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=False)
    grace = 1 if plan.max_t < 8 else 2
    scheduler = ASHAScheduler(time_attr="epoch", max_t=plan.max_t, grace_period=max(grace, plan.eval_step),
                              reduction_factor=2)
    return tune.Tuner(
        trainable,
        param_space=search_space(plan.params),
        tune_config=tune.TuneConfig(metric=plan.metric, mode="max", scheduler=scheduler, num_samples=num_samples,
                                    search_alg=_search_alg(search_alg, plan.metric, max_concurrent, plan.seed)),
        run_config=RunConfig(storage_path=str(plan.exp_dir.parent), name=plan.exp_dir.name, verbose=1,
                             failure_config=FailureConfig(max_failures=0, fail_fast=False)),
    )


def run_search(model: str, dataset: str, hyper_file: str, config_files: Optional[list[str]] = None,
               config_dict: Optional[dict] = None, overrides: Optional[dict] = None, num_samples: int = 8,
               search_alg: str = "random", max_concurrent: int = 0, cpus_per_trial: float = 1.0,
               gpus_per_trial: float = 0.0, ray_address: Optional[str] = None,
               storage_path: str = "ray_results", tune_name: Optional[str] = None, resume: bool = False,
               num_cpus: Optional[int] = None, out=None) -> dict:
    """The search; returns ``{'rows', 'table', 'best', 'best_config', 'csv', 'experiment'}``."""
    from ray import tune

    out = out or sys.stdout
    if num_samples < 1:
        raise PluginConfigError(f"--num_samples must be >= 1, got {num_samples}")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise PluginConfigError("--cpus_per_trial must be > 0 and --gpus_per_trial >= 0")
    plan = plan_search(model, dataset, hyper_file, config_files, config_dict, overrides, storage_path, tune_name, resume)
    started = _ray_init(ray_address, num_cpus)
    try:
        t0 = time.perf_counter()
        _prepare_all(model, dataset, plan.config_files, plan.user, plan.params)
        print(f"inputs prepared in {time.perf_counter() - t0:.1f} s (data + encoder cache, once for all trials)",
              file=out, flush=True)
        trainable = tune.with_resources(
            tune.with_parameters(tune_trainable, model=model, dataset=dataset, config_files=plan.config_files,
                                 fixed=plan.fixed, metric=plan.metric, base_iisan_lr=plan.base_iisan_lr,
                                 gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, max_t=plan.max_t,
                                 int_keys=plan.int_keys),
            {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
        )
        tuner = _tuner(plan, trainable, resume, num_samples, search_alg, max_concurrent, out)
        t0 = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - t0
    finally:
        if started:
            import ray

            ray.shutdown()
    summary = _trials_table(plan, grid, wall, num_samples, out)
    summary.update(_best_trial(plan, summary["rows"], out))
    return summary


def _trials_table(plan: SearchPlan, grid, wall: float, num_samples: int, out) -> dict:
    """The table of trials (printed, and ``trials.csv`` in the experiment folder)."""
    results = sorted((grid[i] for i in range(len(grid))), key=_trial_id)
    rows = _trial_rows(results, plan.metric, plan.tuned, trial_states(grid, plan.exp_dir))
    columns = ["trial"] + plan.tuned + [f"best valid {plan.metric}", "epochs run", "status"]
    table = markdown_table(rows, columns)
    plan.exp_dir.mkdir(parents=True, exist_ok=True)
    csv_path = plan.exp_dir / "trials.csv"
    write_csv(csv_path, rows, columns)
    n_stopped = sum(r["status"] == STATUS_STOPPED for r in rows)
    n_err = sum(r["status"].startswith("error") for r in rows)
    n_done = sum(r["_final"] for r in rows)
    # trials the search had not created yet when it was interrupted count as interrupted too
    n_int = sum(r["status"] == STATUS_INTERRUPTED for r in rows) + max(0, num_samples - len(rows))
    print(f"\n{plan.model} on {plan.dataset}: {len(rows)} trials in {wall:.0f} s ({n_done} completed, {n_stopped} "
          f"stopped early by ASHA, {n_err} failed" + (f", {n_int} interrupted" if n_int else "")
          + f"); selection on validation {plan.metric}\n\n{table}\n\ntrial table: {csv_path}", file=out, flush=True)
    if n_int:
        print(f"the search was interrupted: continue it with the same command and --resume "
              f"(experiment {plan.exp_dir})", file=out, flush=True)
    return {"rows": rows, "table": table, "csv": str(csv_path), "experiment": str(plan.exp_dir), "best": None,
            "best_config": None, "wall_seconds": wall, "metric": plan.metric}


def _best_trial(plan: SearchPlan, rows: list, out) -> dict:
    """The best finished trial by validation: printed, and its config as ``best_config.yaml``."""
    finished = [r for r in rows if r["_final"] and r["_best"] is not None and not math.isnan(r["_best"])]
    if not finished:
        print("no trial finished: no best configuration", file=out, flush=True)
        return {}
    best = max(finished, key=lambda r: r["_best"])
    res = best["_result"]
    last = res.metrics or {}
    valid = json.loads(last.get("best_valid_result") or "{}")
    test = json.loads(last.get("test_result") or "{}")
    values = dict(plan.user)
    values.update(trial_config_dict({}, {k: (res.config or {})[k] for k in plan.tuned if k in (res.config or {})},
                                    plan.base_iisan_lr, plan.int_keys))
    values.pop("show_progress", None)
    best_path = plan.exp_dir / "best_config.yaml"
    write_best_config(best_path, values, f"# best of {len(rows)} trials of {plan.model} on {plan.dataset} "
                                         f"(validation {plan.metric} {best['_best']:.4f}, trial {best['trial']})\n"
                                         f"# use: --config_files={best_path}\n",
                      tuned=list(plan.tuned) + (["iisan_lr"] if "iisan_lr" in values and "learning_rate" in plan.tuned else []))
    print(f"\nbest trial {best['trial']} (by validation {plan.metric}): "
          + ", ".join(f"{k}={_fmt(native(values[k]))}" for k in plan.tuned if k in values)
          + "\n  valid: " + ", ".join(f"{k} {v:.4f}" for k, v in valid.items())
          + "\n  test:  " + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
          + (f"\n  checkpoint: {last.get('checkpoint')}" if last.get("checkpoint") else "")
          + (f"\n  result file: {last.get('result_file')}" if last.get("result_file") else "")
          + f"\nbest configuration: {best_path}", file=out, flush=True)
    return {"best": {"trial": best["trial"], "valid": valid, "test": test, "config": values,
                     "checkpoint": last.get("checkpoint")}, "best_config": str(best_path)}


def main(args: argparse.Namespace, overrides: dict, config_files: Optional[list[str]],
         config_dict: Optional[dict]) -> int:
    """``run_recbole_iisan.py --tune=hyper.test``: 0 when at least one trial finished, else 1."""
    summary = run_search(
        args.model, args.dataset, args.tune, config_files=config_files, config_dict=config_dict, overrides=overrides,
        num_samples=args.num_samples, search_alg=args.search_alg, max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, ray_address=args.ray_address,
        storage_path=args.storage_path, tune_name=args.tune_name, resume=bool(args.resume is True),
    )
    return 0 if summary["best"] is not None else 1
