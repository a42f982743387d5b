"""Hyper-parameter search machinery on Ray Tune (RecBole's ``recbole/trainer/hyper_tuning.py``
reads the same ``hyper.test`` format): the search space, the search algorithms, Ray's start, and
the table of trials. The trial itself (a plugin run) and the driver are
:mod:`recbole_iisan.quick_start.tune`.

* ``hyper.test`` is read in RecBole's format (``name type values``; ``choice``, ``uniform``,
  ``loguniform`` with RecBole's natural-log bounds, ``quniform``) into a Ray Tune search space.
* Ray Tune >= 2.45, its current API (``tune.Tuner``, ``tune.RunConfig(storage_path=...)``,
  ``tune.report(dict)``, ASHA, ``tune.Tuner.restore``); RecBole's own ``run_hyper.py`` and its
  ``ray<=2.6.3`` are not used (docs/installation.md).
"""
from __future__ import annotations

import ast
from logging import getLogger
import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.utils.files import atomic_write_text

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

    from recbole_iisan.utils.compat import quiet_ray_warnings

    quiet_ray_warnings()
    if ray.is_initialized():
        return False
    if address:
        getLogger().info(f"joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 configure_logging=True, logging_level="warning", log_to_driver=False)
    return True


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
