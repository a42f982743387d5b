"""Ray Tune hyper-parameter search for plugin (IISANVS / IISANVA) and RecBole models.

    python run_recbole_iisan.py --model=IISANVS --dataset=Scientific --tune=hyper.test \\
        [--num_samples=8] [--search_alg=random|hyperopt|optuna] [--max_concurrent=N] \\
        [--cpus_per_trial=1] [--gpus_per_trial=0.25] [--ray_address=auto] \\
        [--storage_path=ray_results] [--tune_name=NAME] [--resume] [--key=value ...]

How it works (Ray Tune >= 2.45, its current API: ``tune.Tuner``, ``tune.RunConfig(storage_path=...)``,
``tune.report(dict)`` after every epoch, ASHA, ``tune.Tuner.restore``; RecBole's own ``run_hyper.py``
and its ``ray<=2.6.3`` are not used, see docs/installation.md):

* ``hyper.test`` is read in RecBole's format (``name type values``; ``choice``, ``uniform``,
  ``loguniform`` with RecBole's natural-log bounds, ``quniform``) into a Ray Tune search space.
* The driver prepares the data and builds the encoder cache ONCE (``quick_start.prepare_inputs``,
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
import ast
import itertools
import json
import math
import os
import re
import sys
import time
from logging import getLogger
from pathlib import Path
from typing import Any, Optional, Sequence

from recbole_iisan.errors import PluginConfigError
from recbole_iisan.report import markdown_table, write_csv
from recbole_iisan.utils import atomic_write_text
from recbole_iisan.utils import config_get as _cfg

HYPER_TYPES = ("choice", "uniform", "loguniform", "quniform")

#: config keys that change which hidden states the cache must hold: the driver prepares the cache
#: for every value of these that the search space can sample
CACHE_KEYS = ("layer_scheme", "deep_layer_scheme", "layerdrop", "include_embedding_state", "group_stride")

#: config keys that name files or folders; relative ones are made absolute for the trials (which
#: run in their own trial folder). ``checkpoint_dir`` stays relative: each trial saves in its folder.
PATH_KEY_SUFFIXES = ("_dir", "_path", "_file", "_encoder")
NO_ABSOLUTE_KEYS = ("checkpoint_dir",)

STATUS_COMPLETED = "completed"
STATUS_STOPPED = "stopped early by ASHA"
STATUS_INTERRUPTED = "interrupted (continue with --resume)"
FINAL_KEY = "trial_finished"
#: quick_start.run's result file in each trial folder (Ray Tune's own is result.json, JSON lines)
RESULT_FILE = "recbole_result.json"


# --------------------------------------------------------------------------------------------
# hyper.test

class HyperParam:
    """One line of ``hyper.test``: ``name type values`` (kept to print and to build the space)."""

    def __init__(self, name: str, kind: str, values: Any, lineno: int):
        self.name, self.kind, self.values, self.lineno = name, kind, values, lineno

    @property
    def is_int(self) -> bool:
        """``quniform`` with integral bounds and step: sampled as integers (the trial casts them back
        to ``int`` if the search algorithm hands over floats such as 192.0)."""
        return self.kind == "quniform" and all(float(v).is_integer() for v in self.values)

    def __repr__(self) -> str:
        return f"HyperParam({self.name!r}, {self.kind!r}, {self.values!r})"

    def to_tune(self):
        """The Ray Tune domain. ``loguniform a,b`` samples in ``[exp(a), exp(b)]`` (RecBole's and
        hyperopt's natural-log bounds); ``quniform`` with integral bounds samples integers."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            lo, hi = self.values
            return tune.loguniform(math.exp(lo), math.exp(hi))
        lo, hi, q = self.values
        if self.is_int:
            return tune.qrandint(int(lo), int(hi), int(q))
        return tune.quniform(lo, hi, q)


def _numbers(text: str, n: int, where: str, kind: str, expected: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != n:
        raise PluginConfigError(f"{where}: '{kind}' expects {expected}, got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise PluginConfigError(f"{where}: '{kind}' expects {expected} (numbers), got {text!r}") from None


def parse_hyper_line(line: str, where: str) -> Optional[HyperParam]:
    """One ``hyper.test`` line -> HyperParam, or None for a blank or comment line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    text = re.sub(r"\s+#.*$", "", text)  # trailing comment (after whitespace)
    parts = text.split(None, 2)
    if len(parts) < 3:
        raise PluginConfigError(f"{where}: expected 'name type values' (type one of {', '.join(HYPER_TYPES)}), "
                                f"got {text!r}")
    name, kind, values = parts[0], parts[1], "".join(parts[2].split())
    if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
        raise PluginConfigError(f"{where}: expected a config key as the first word, got {name!r}")
    lineno = int(where.rsplit(":", 1)[1])
    if kind == "choice":
        try:
            options = ast.literal_eval(parts[2].strip())
        except (ValueError, SyntaxError):
            raise PluginConfigError(f"{where}: 'choice' expects a python list such as [32,64,128], "
                                    f"got {parts[2].strip()!r}") from None
        if not isinstance(options, list) or not options:
            raise PluginConfigError(f"{where}: 'choice' expects a non-empty python list such as [32,64,128], "
                                    f"got {parts[2].strip()!r}")
        return HyperParam(name, kind, list(options), lineno)
    if kind == "uniform":
        lo, hi = _numbers(values, 2, where, kind, "'low,high'")
    elif kind == "loguniform":
        lo, hi = _numbers(values, 2, where, kind, "natural-log bounds 'low,high' (e.g. -8,0 for exp(-8)..1)")
    elif kind == "quniform":
        lo, hi, q = _numbers(values, 3, where, kind, "'low,high,q'")
        if q <= 0:
            raise PluginConfigError(f"{where}: 'quniform' expects q > 0, got {q:g}")
    else:
        raise PluginConfigError(f"{where}: unknown type {kind!r}: expected one of {', '.join(HYPER_TYPES)}")
    if not lo < hi:
        raise PluginConfigError(f"{where}: '{kind}' expects low < high, got {values!r}")
    return HyperParam(name, kind, [lo, hi] if kind != "quniform" else [lo, hi, q], lineno)


def parse_hyper_file(path: str) -> list[HyperParam]:
    """All parameters of a ``hyper.test`` file; a malformed line raises PluginConfigError
    ``'<path>:<line>: ...'``."""
    p = Path(path)
    if not p.is_file():
        raise PluginConfigError(f"hyper-parameter file not found: {path}")
    params: list[HyperParam] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(p.read_text().splitlines(), start=1):
        hp = parse_hyper_line(line, f"{path}:{lineno}")
        if hp is None:
            continue
        if hp.name in seen:
            raise PluginConfigError(f"{path}:{lineno}: '{hp.name}' is already defined on line {seen[hp.name]}")
        seen[hp.name] = lineno
        params.append(hp)
    if not params:
        raise PluginConfigError(f"{path}: no parameters (expected lines 'name type values')")
    return params


def search_space(params: Sequence[HyperParam]) -> dict:
    return {hp.name: hp.to_tune() for hp in params}


# --------------------------------------------------------------------------------------------
# config overrides

def native(value: Any) -> Any:
    """numpy scalars / tuples -> plain python (yaml, json, RecBole's type checks)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    if isinstance(value, tuple):
        return [native(v) for v in value]
    if isinstance(value, list):
        return [native(v) for v in value]
    if isinstance(value, dict):
        return {k: native(v) for k, v in value.items()}
    return value




def absolute_paths(config: Any, fixed: dict) -> dict:
    """Config values naming existing relative files or folders -> absolute (trials chdir)."""
    out = {}
    keys = set(fixed) | set(getattr(config, "final_config_dict", {}) or {})
    for key in keys:
        if key in NO_ABSOLUTE_KEYS or not key.endswith(PATH_KEY_SUFFIXES):
            continue
        value = fixed.get(key, _cfg(config, key))
        if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(value):
            out[key] = os.path.abspath(value)
    return out


# --------------------------------------------------------------------------------------------
# the trial

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
    from recbole_iisan import quick_start

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


def _storage_trial_dir() -> str:
    """This trial's folder under ``<storage_path>/<name>/`` (local or a shared file system).

    Ray >= 2.7 runs a trial in a scratch working folder and ``get_trial_dir()`` names a staging
    folder on the driver's node (``/tmp/ray/session_*/artifacts/...``); RecBole's log/, saved/ and
    the result file belong in the persistent trial folder, which every node of a cluster reads
    (``StorageContext.trial_fs_path``; the storage path is always an absolute local path here)."""
    from ray import tune

    ctx = tune.get_context()
    try:
        return ctx.get_storage().trial_fs_path
    except AttributeError:  # no storage context in this Ray: the staging folder, synced by Ray
        return ctx.get_trial_dir()


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


# --------------------------------------------------------------------------------------------
# the driver

def _search_alg(name: str, metric: str, max_concurrent: int, seed: Optional[int]):
    name = (name or "random").lower()
    alg = None
    if name == "random":
        from ray.tune.search import BasicVariantGenerator

        # seeded by the config's seed: the same command samples the same configurations
        return BasicVariantGenerator(max_concurrent=max(0, max_concurrent), random_state=seed)
    if name == "hyperopt":
        try:
            from ray.tune.search.hyperopt import HyperOptSearch
            import hyperopt  # noqa: F401
        except ImportError:
            raise PluginConfigError("--search_alg=hyperopt needs hyperopt: pip install hyperopt==0.2.7") from None
        alg = HyperOptSearch(metric=metric, mode="max", random_state_seed=seed)
    elif name == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna
        except ImportError:
            raise PluginConfigError("--search_alg=optuna needs optuna: pip install optuna") from None
        alg = OptunaSearch(metric=metric, mode="max", sampler=optuna.samplers.TPESampler(seed=seed))
    else:
        raise PluginConfigError(f"--search_alg: expected random, hyperopt or optuna, got {name!r}")
    if max_concurrent > 0:
        from ray.tune.search import ConcurrencyLimiter

        alg = ConcurrencyLimiter(alg, max_concurrent=max_concurrent)
    return alg


def _ray_init(address: Optional[str], num_cpus: Optional[int] = None) -> bool:
    """Join ``address`` or start a local instance; returns whether this call started Ray.

    Trials' RecBole logs stay in their trial folders (``<trial>/log/``), not on the driver's
    console; errors still reach it (Ray Tune prints them, and the final table has them)."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}}
    if address:
        getLogger().info(f"joining the Ray cluster at {address}")
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=env,
                 configure_logging=True, logging_level="warning", log_to_driver=False)
    return True


def _prepare_all(model: str, dataset: str, config_files, config_dict: dict, params: Sequence[HyperParam]) -> None:
    """Data + encoder cache once, for every cache-relevant value the search can sample."""
    from recbole_iisan import quick_start
    from recbole_iisan.config import build_config

    choices = [(hp.name, hp.values) for hp in params if hp.name in CACHE_KEYS and hp.kind == "choice"]
    if not choices:
        quick_start.prepare_inputs(build_config(model, dataset, config_files, config_dict))
        return
    names = [n for n, _ in choices]
    # widest first ('all' layers), so the later ones reuse it instead of growing the cache
    combos = list(itertools.product(*[sorted(v, key=lambda x: x != "all" and x is not False) for _, v in choices]))
    for combo in combos:
        extra = dict(zip(names, combo))
        getLogger().info(f"preparing inputs for {extra}")
        quick_start.prepare_inputs(build_config(model, dataset, config_files, dict(config_dict, **extra)))


def trial_states(grid, exp_dir: Optional[Path] = None) -> dict:
    """trial id -> (status, config): TERMINATED, ERROR, RUNNING, PENDING or PAUSED, and the sampled
    parameters (also of a trial that never reported). Read from the experiment state Ray Tune saved
    in ``exp_dir`` (after Ctrl-C it lists the interrupted trials as RUNNING / PENDING), else from
    the ResultGrid's own analysis."""
    trials = None
    if exp_dir is not None and any(Path(exp_dir).glob("experiment_state*.json")):
        try:
            from ray.tune import ExperimentAnalysis

            trials = ExperimentAnalysis(str(exp_dir)).trials
        except Exception:  # noqa: BLE001  (an unreadable state: fall back to the grid)
            trials = None
    if trials is None:
        try:
            trials = grid._experiment_analysis.trials
        except Exception:  # noqa: BLE001  (private in Ray: without it, interrupted reads as not run)
            return {}
    return {t.trial_id: (t.status, dict(t.config or {})) for t in trials}


def _trial_rows(results, metric: str, param_names: Sequence[str], states: Optional[dict] = None) -> list[dict]:
    rows = []
    states = states or {}
    for res in results:
        trial_id = _trial_id(res)
        state, saved_cfg = states.get(trial_id, (None, {}))
        cfg = res.config or saved_cfg  # a trial that never reported has no config in its result
        row: dict = {"trial": trial_id}
        for n in param_names:
            row[n] = _fmt(native(cfg.get(n)))
        df = None
        try:
            df = res.metrics_dataframe
        except Exception:  # noqa: BLE001
            df = None
        last = res.metrics or {}
        best = None
        epochs = 0
        if df is not None and len(df) and metric in df:
            vals = df[metric].dropna()
            best = float(vals.max()) if len(vals) else None
            if "epoch" in df:
                e = df["epoch"].dropna()
                epochs = int(e.max()) if len(e) else 0
        if last.get(FINAL_KEY):
            best = float(last.get(metric)) if last.get(metric) is not None else best
            epochs = int(last.get("epochs_run") or epochs)
        if res.error is not None:
            status = "error: " + _one_line(res.error)
        elif last.get(FINAL_KEY):
            status = STATUS_COMPLETED
        elif state in ("RUNNING", "PENDING", "PAUSED") or (state is None and not epochs):
            status = STATUS_INTERRUPTED
        elif epochs:
            status = STATUS_STOPPED
        else:
            status = "not run"
        row.update({f"best valid {metric}": "" if best is None or math.isnan(best) else f"{best:.4f}",
                    "epochs run": str(epochs), "status": status,
                    "_best": best, "_final": bool(last.get(FINAL_KEY)), "_result": res})
        rows.append(row)
    return rows


def _trial_id(res) -> str:
    path = getattr(res, "path", None)
    tid = (res.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    return Path(str(path)).name if path else "?"


def _one_line(err: Any) -> str:
    text = str(err).strip().splitlines()
    # the root cause is the last line of a RayTaskError traceback
    msg = next((l.strip() for l in reversed(text) if l.strip()), type(err).__name__)
    return msg[:160].replace("|", "/")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_best_config(path: Path, values: dict, header: str, tuned: Sequence[str] = ()) -> None:
    import yaml

    text = header
    for title, keys in (("fixed overrides", [k for k in values if k not in tuned]),
                        ("tuned", [k for k in values if k in tuned])):
        if keys:
            text += f"# {title}\n" + yaml.safe_dump({k: native(values[k]) for k in keys}, sort_keys=False,
                                                   default_flow_style=False)
    atomic_write_text(path, text)


def run_search(model: str, dataset: str, hyper_file: str, config_files: Optional[list[str]] = None,
               config_dict: Optional[dict] = None, overrides: Optional[dict] = None, num_samples: int = 8,
               search_alg: str = "random", max_concurrent: int = 0, cpus_per_trial: float = 1.0,
               gpus_per_trial: float = 0.0, ray_address: Optional[str] = None,
               storage_path: str = "ray_results", tune_name: Optional[str] = None, resume: bool = False,
               num_cpus: Optional[int] = None, out=None) -> dict:
    """The search; returns ``{'rows', 'table', 'best', 'best_config', 'csv', 'experiment'}``."""
    from ray import tune
    from ray.tune import FailureConfig, RunConfig
    from ray.tune.schedulers import ASHAScheduler

    from recbole_iisan.config import build_config, get_model_class

    out = out or sys.stdout
    logger = getLogger()
    params = parse_hyper_file(hyper_file)
    get_model_class(model)  # unknown names fail before anything starts
    if num_samples < 1:
        raise PluginConfigError(f"--num_samples must be >= 1, got {num_samples}")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise PluginConfigError("--cpus_per_trial must be > 0 and --gpus_per_trial >= 0")
    config_files = [os.path.abspath(f) for f in config_files] if config_files else None
    user = dict(config_dict or {})
    user.update(overrides or {})
    tuned = [hp.name for hp in params]
    int_keys = [hp.name for hp in params if hp.is_int]
    clash = sorted(set(tuned) & set(user))
    if clash:
        logger.warning(f"{clash} are given on the command line and in {hyper_file}: the sampled values win")

    config = build_config(model, dataset, config_files, user)
    from recbole_iisan.checks import check_search_space

    check_search_space(params, config, hyper_file)  # every value the space can sample, before Ray starts
    metric = str(config["valid_metric"]).lower()
    max_t = int(config["epochs"])
    eval_step = int(_cfg(config, "eval_step", 1) or 1)
    if "epochs" in tuned:
        raise PluginConfigError(f"{hyper_file}: 'epochs' cannot be tuned (ASHA's budget): set --epochs")
    storage = os.path.abspath(os.path.expanduser(storage_path))
    name = tune_name or f"{model}-{dataset}"
    exp_dir = Path(storage) / name

    fixed = dict(user)
    fixed["data_path"] = str(Path(config["data_path"]).resolve().parent)
    fixed.update(absolute_paths(config, user))
    fixed["cache_rebuild"] = "never"
    base_iisan_lr = None
    from recbole_iisan.quick_start import needs_item_states

    if needs_item_states(get_model_class(model)):
        from recbole_iisan.data.cache import cache_root

        fixed["cache_dir"] = str(Path(cache_root(config)).resolve())
        lr = _cfg(config, "iisan_lr")
        base_iisan_lr = dict(lr) if isinstance(lr, dict) else None

    if not resume and exp_dir.exists() and any(exp_dir.glob("experiment_state*.json")):
        raise PluginConfigError(f"the search {exp_dir} exists: add --resume to continue it, or choose "
                                f"another --tune_name / --storage_path")
    started = _ray_init(ray_address, num_cpus)
    try:
        t0 = time.perf_counter()
        _prepare_all(model, dataset, config_files, user, params)
        print(f"inputs prepared in {time.perf_counter() - t0:.1f} s (data + encoder cache, once for all trials)",
              file=out, flush=True)
        trainable = tune.with_resources(
            tune.with_parameters(tune_trainable, model=model, dataset=dataset, config_files=config_files,
                                 fixed=fixed, metric=metric, base_iisan_lr=base_iisan_lr,
                                 gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, max_t=max_t,
                                 int_keys=int_keys),
            {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
        )
        if resume:
            if not tune.Tuner.can_restore(str(exp_dir)):
                raise PluginConfigError(f"--resume: no search to resume in {exp_dir} "
                                        f"(check --storage_path and --tune_name)")
            print(f"resuming the search from {exp_dir}", file=out, flush=True)
            logger.info(f"resuming the search from {exp_dir}")
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False)
        else:
            grace = 1 if max_t < 8 else 2
            scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=max(grace, eval_step),
                                      reduction_factor=2)
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(params),
                tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler,
                                            search_alg=_search_alg(search_alg, metric, max_concurrent,
                                                                   _cfg(config, "seed")),
                                            num_samples=num_samples),
                run_config=RunConfig(storage_path=storage, name=name, verbose=1,
                                     failure_config=FailureConfig(max_failures=0, fail_fast=False)),
            )
        t0 = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - t0
    finally:
        if started:
            import ray

            ray.shutdown()

    results = sorted((grid[i] for i in range(len(grid))), key=_trial_id)
    rows = _trial_rows(results, metric, tuned, trial_states(grid, exp_dir))
    columns = ["trial"] + tuned + [f"best valid {metric}", "epochs run", "status"]
    table = markdown_table(rows, columns)
    exp_dir.mkdir(parents=True, exist_ok=True)
    csv_path = exp_dir / "trials.csv"
    write_csv(csv_path, rows, columns)
    n_stopped = sum(r["status"] == STATUS_STOPPED for r in rows)
    n_err = sum(r["status"].startswith("error") for r in rows)
    n_done = sum(r["_final"] for r in rows)
    # trials the search had not created yet when it was interrupted count as interrupted too
    n_int = sum(r["status"] == STATUS_INTERRUPTED for r in rows) + max(0, num_samples - len(rows))
    print(f"\n{model} on {dataset}: {len(rows)} trials in {wall:.0f} s ({n_done} completed, {n_stopped} stopped "
          f"early by ASHA, {n_err} failed" + (f", {n_int} interrupted" if n_int else "")
          + f"); selection on validation {metric}\n\n{table}\n\ntrial table: {csv_path}", file=out, flush=True)
    if n_int:
        print(f"the search was interrupted: continue it with the same command and --resume "
              f"(experiment {exp_dir})", file=out, flush=True)

    finished = [r for r in rows if r["_final"] and r["_best"] is not None and not math.isnan(r["_best"])]
    summary = {"rows": rows, "table": table, "csv": str(csv_path), "experiment": str(exp_dir), "best": None,
               "best_config": None, "wall_seconds": wall, "metric": metric}
    if not finished:
        print("no trial finished: no best configuration", file=out, flush=True)
        return summary
    best = max(finished, key=lambda r: r["_best"])
    res = best["_result"]
    last = res.metrics or {}
    valid = json.loads(last.get("best_valid_result") or "{}")
    test = json.loads(last.get("test_result") or "{}")
    values = {k: v for k, v in user.items()}
    values.update(trial_config_dict({}, {k: (res.config or {})[k] for k in tuned if k in (res.config or {})},
                                    base_iisan_lr, int_keys))
    values.pop("show_progress", None)
    best_path = exp_dir / "best_config.yaml"
    write_best_config(best_path, values, f"# best of {len(rows)} trials of {model} on {dataset} "
                                         f"(validation {metric} {best['_best']:.4f}, trial {best['trial']})\n"
                                         f"# use: --config_files={best_path}\n",
                      tuned=list(tuned) + (["iisan_lr"] if "iisan_lr" in values and "learning_rate" in tuned else []))
    print(f"\nbest trial {best['trial']} (by validation {metric}): "
          + ", ".join(f"{k}={_fmt(native(values[k]))}" for k in tuned if k in values)
          + "\n  valid: " + ", ".join(f"{k} {v:.4f}" for k, v in valid.items())
          + "\n  test:  " + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
          + (f"\n  checkpoint: {last.get('checkpoint')}" if last.get("checkpoint") else "")
          + (f"\n  result file: {last.get('result_file')}" if last.get("result_file") else "")
          + f"\nbest configuration: {best_path}", file=out, flush=True)
    summary.update({"best": {"trial": best["trial"], "valid": valid, "test": test, "config": values,
                             "checkpoint": last.get("checkpoint")},
                    "best_config": str(best_path)})
    return summary


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
