"""Training checkpoints: files that run no code when loaded, written atomically, read back with
one-line errors.

RecBole's ``Trainer`` pickles its checkpoints (``torch.save`` of the whole ``Config``) straight onto
the path and reads them with a bare ``torch.load``: loading a checkpoint someone hands you can run
any code, an interrupted save leaves half a file, and a file that does not load ends in a torch
traceback. :class:`~recbole_iisan.trainer.trainer.PluginTrainer` calls this module instead:

- :func:`save` writes the state as safetensors + JSON (:mod:`.checkpoint_file`: tensors in the
  file, the config values and the training state in its metadata; no pickle) with
  ``utils.atomic_write_bytes`` (temp file in the same folder + fsync + rename): the path holds the
  previous checkpoint or the new one, never part of one. A full disk raises
  :class:`~recbole_iisan.utils.errors.CheckpointError` saying so (the previous checkpoint is intact).
- :func:`load` reads it with ``json`` and ``safetensors`` only. A checkpoint of RecBole or of
  recbole-iisan 0.1 (a torch pickle) is read through an allow-list (:mod:`.legacy_checkpoint`);
  one that names anything else is refused in one line naming the file and ``--trust_checkpoint``
  (``trust=True``: torch's plain ``torch.load``, which runs what the file holds). Every other
  problem is one line naming the file and what is wrong (missing, empty, truncated, not a
  checkpoint, not a RecBole checkpoint).
- :func:`load_model_state` / :func:`load_optimizer_state` refuse a checkpoint of another model or
  of other sizes, naming the first parameter that differs.

The state keeps RecBole's keys (``config``, ``epoch``, ``cur_step``, ``best_valid_score``,
``state_dict``, ``other_parameter``, ``optimizer``), plus :data:`HISTORY_KEY`: the per-epoch history
(train seconds, evaluation seconds, validation scores and results) that lets a resumed run report
the whole run. ``config`` is plain data: ``{"model", "dataset", "values"}``, ``values`` being the
run's own settings (its yaml files, ``config_dict`` and command line: ``config.stored_config``), from
which ``--recommend`` rebuilds the RecBole ``Config`` with ``config.build_config``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from recbole_iisan.trainer import checkpoint_file
from recbole_iisan.utils.errors import CheckpointError, is_disk_full
from recbole_iisan.utils.files import PathLike, atomic_write_bytes


HISTORY_KEY = "plugin_history"
REQUIRED_KEYS = ("epoch", "state_dict")
TRUST_HINT = ("--trust_checkpoint loads it as torch.load does, which runs whatever the file holds: only for a "
              "file from someone you trust")


def save(state: dict, path: PathLike, previous: Optional[PathLike] = None) -> Path:
    """Write ``state`` to ``path`` atomically; CheckpointError (one line) when that fails, naming
    the previous checkpoint (``path`` itself if it exists, else ``previous``), which is intact."""
    p = Path(path)
    try:
        data = checkpoint_file.to_bytes(state)
    except checkpoint_file.FormatError as exc:
        raise CheckpointError(f"cannot save checkpoint {p}: {exc}") from None
    try:
        return atomic_write_bytes(p, data)
    except OSError as exc:
        prev = p if p.is_file() else (Path(previous) if previous and Path(previous).is_file() else None)
        before = (f"the previous checkpoint {prev} is intact (--resume={prev} continues from it)" if prev
                  else "nothing was written")
        if is_disk_full(exc, p.parent):
            raise CheckpointError(f"disk full while saving checkpoint {p}: {before}; free space "
                                  f"and re-run") from exc
        raise CheckpointError(f"cannot write checkpoint {p} ({exc.strerror or exc}); {before}") from exc


def _unreadable_reason(p: Path, exc: BaseException) -> str:
    import zipfile

    size = p.stat().st_size
    if checkpoint_file.kind(p) == "zip" and not zipfile.is_zipfile(p):
        return f"truncated ({size:,} bytes, the end of the file is missing)"
    if isinstance(exc, (ModuleNotFoundError, AttributeError, ImportError)):
        return f"saved by code that is not installed here ({type(exc).__name__}: {exc})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"not a torch checkpoint or damaged ({type(exc).__name__}: {first[:120]})"


def _read_legacy(p: Path, map_location: Any, trust: bool) -> Any:
    """A torch pickle checkpoint (RecBole's, recbole-iisan 0.1's), with its config as plain data."""
    from recbole_iisan.trainer import legacy_checkpoint

    try:
        ck = legacy_checkpoint.read_legacy(p, map_location, trust)
    except checkpoint_file.UnsafePickle as exc:
        raise CheckpointError(f"checkpoint {p}: not loaded: it is a pickle that refers to {exc.name}, which a "
                              f"RecBole checkpoint never holds, and loading it could run code; "
                              f"{TRUST_HINT}") from None
    if isinstance(ck, dict) and "config" in ck and not isinstance(ck["config"], dict):
        from recbole_iisan.config.configurator import legacy_stored_config

        ck["config"] = legacy_stored_config(legacy_checkpoint.config_state(ck["config"]))
    return ck


def _read(p: Path, map_location: Any, trust: bool) -> Any:
    kind = checkpoint_file.kind(p)
    try:
        if kind == "safetensors":
            return checkpoint_file.read(p, map_location)
        return _read_legacy(p, map_location, trust)
    except CheckpointError:
        raise
    except checkpoint_file.FormatError as exc:
        raise CheckpointError(f"checkpoint {p}: {exc}") from None
    except Exception as exc:  # torch / safetensors raise RuntimeError, UnpicklingError, EOFError, ValueError...
        raise CheckpointError(f"checkpoint {p}: cannot be read: {_unreadable_reason(p, exc)}") from None


def load(path: PathLike, map_location: Any = "cpu", trust: bool = False) -> dict:
    """The checkpoint dict at ``path`` (``config`` as plain data); CheckpointError naming the file
    and the problem. ``trust``: a legacy pickle is loaded as torch loads it (runs its code)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p}: not found" + (" (it is a folder)" if p.is_dir() else ""))
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p}: empty file (0 bytes), not a checkpoint "
                              f"(an interrupted save by an older version?)")
    ck = _read(p, map_location, trust)
    if not isinstance(ck, dict):
        raise CheckpointError(f"checkpoint {p}: not a RecBole checkpoint (holds a {type(ck).__name__}, "
                              f"expected a dict with {', '.join(REQUIRED_KEYS)})")
    missing = [k for k in REQUIRED_KEYS if k not in ck]
    if missing or not isinstance(ck.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {p}: not a RecBole training checkpoint (no "
                              f"{', '.join(repr(k) for k in missing or ['state_dict'])})")
    return ck


def trusted(config: Any) -> bool:
    """Whether the run's config lets a legacy pickle checkpoint run its code (``trust_checkpoint``)."""
    try:
        return config["trust_checkpoint"] is True
    except KeyError:
        return False


def _model_name(ck: dict) -> Optional[str]:
    try:
        return str(ck["config"]["model"])
    except Exception:  # noqa: BLE001  (a checkpoint without a readable config)
        return None


def check_model_name(ck: dict, model: str, path: PathLike) -> None:
    saved = _model_name(ck)
    if saved is not None and saved.lower() != str(model).lower():
        raise CheckpointError(f"checkpoint {path}: holds a {saved} model, this run trains {model}")


def _shape(t: Any) -> list:
    return list(t.shape) if hasattr(t, "shape") else []


def load_model_state(model: torch.nn.Module, ck: dict, path: PathLike) -> None:
    """Load the checkpoint's parameters into ``model``, or refuse with one line naming the first
    parameter that is missing, extra or of another shape."""
    own = model.state_dict()
    theirs = ck["state_dict"]
    for key, value in own.items():
        if key in theirs and _shape(theirs[key]) != _shape(value):
            raise CheckpointError(
                f"checkpoint {path}: does not fit this model: '{key}' is {_shape(theirs[key])} in the "
                f"checkpoint and {_shape(value)} in the model (saved with other sizes, e.g. "
                f"embedding_size / hidden_size?)")
    missing = [k for k in own if k not in theirs]
    extra = [k for k in theirs if k not in own]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing (e.g. '{missing[0]}')")
        if extra:
            parts.append(f"{len(extra)} unknown parameter(s) (e.g. '{extra[0]}')")
        raise CheckpointError(f"checkpoint {path}: does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(theirs)
    if hasattr(model, "load_other_parameter"):
        model.load_other_parameter(ck.get("other_parameter"))


def load_optimizer_state(optimizer: torch.optim.Optimizer, ck: dict, path: PathLike) -> None:
    state = ck.get("optimizer")
    if state is None:
        raise CheckpointError(f"checkpoint {path}: holds no optimizer state (not saved by a training run); "
                              f"it can be evaluated but not resumed")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: its optimizer state does not fit this run "
                              f"(another learner or parameter groups: {' '.join(str(exc).split())[:120]})") from None


def same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def resumed_name(own: PathLike, resumed_from: PathLike) -> str:
    """Where a resumed run saves: its own new name, never the file it resumed from."""
    own = str(own)
    if not same_file(own, resumed_from) and os.path.abspath(own) != os.path.abspath(resumed_from):
        return own
    stem, ext = os.path.splitext(own)
    k = 1
    while os.path.exists(f"{stem}-resumed{k}{ext}"):
        k += 1
    return f"{stem}-resumed{k}{ext}"


# --------------------------------------------------------------------------------------------
# what PluginTrainer calls

def best_index(scores: list, bigger: bool = True, first: bool = False) -> int:
    """Index of the best validation score as the selection rule counts it: RecBole's
    ``early_stopping`` takes a tie with the best so far as an improvement (``>=``), so the LAST of
    equal best scores is the one saved; the authors' rule (``first=True``) keeps the FIRST."""
    import numpy as np

    s = np.asarray(scores, dtype=float)
    best = s.max() if bigger else s.min()
    ties = np.flatnonzero(s == best)
    return int(ties[0] if first else ties[-1])


def history_state(trainer: Any) -> dict:
    """The per-epoch history a resumed run needs to report the whole run."""
    return {"train_epoch_seconds": list(trainer.train_epoch_seconds), "eval_seconds": list(trainer.eval_seconds),
            "valid_scores": list(trainer.valid_scores), "valid_results": list(trainer.valid_results),
            "train_loss": {str(k): _plain_loss(v) for k, v in trainer.train_loss_dict.items()}}


def _plain_loss(v: Any) -> Any:
    """An epoch's training loss as JSON: a float, or a list for RecBole models with several losses."""
    return [float(x) for x in v] if isinstance(v, (tuple, list)) else float(v)


def restore_history(trainer: Any, history: dict) -> None:
    """The inverse of :func:`history_state`."""
    trainer.train_epoch_seconds = list(history.get("train_epoch_seconds", []))
    trainer.eval_seconds = list(history.get("eval_seconds", []))
    trainer.valid_scores = list(history.get("valid_scores", []))
    trainer.valid_results = list(history.get("valid_results", []))
    trainer.train_loss_dict.update({int(k): tuple(v) if isinstance(v, list) else float(v)
                                    for k, v in (history.get("train_loss") or {}).items()})


def trainer_state(trainer: Any, epoch: int) -> dict:
    """RecBole's checkpoint keys (the config as plain values) + the per-epoch history."""
    from recbole_iisan.config.configurator import stored_config

    return {
        "config": stored_config(trainer.config),
        "epoch": epoch,
        "cur_step": trainer.cur_step,
        "best_valid_score": trainer.best_valid_score,
        "state_dict": trainer.model.state_dict(),
        "other_parameter": trainer.model.other_parameter(),
        "optimizer": trainer.optimizer.state_dict(),
        HISTORY_KEY: history_state(trainer),
    }


def save_trainer(trainer: Any, epoch: int, path: Optional[PathLike] = None) -> str:
    """RecBole's checkpoint state + the history, saved atomically. A run resumed from a file never
    writes that file: its first save goes to a new name (logged), which becomes
    ``trainer.saved_model_file``."""
    path = str(path or trainer.saved_model_file)
    if epoch < 0 and trainer.resumed_from is not None:
        # RecBole "saves" epoch -1 when a resumed run has no epoch left to train: the resumed
        # checkpoint already holds that model, so nothing is written
        return trainer.saved_model_file
    if trainer.resumed_from is not None and same_file(path, trainer.resumed_from):
        path = resumed_name(getattr(trainer, "own_model_file", path), trainer.resumed_from)
        trainer.saved_model_file = path
        trainer.logger.info(f"resumed from {trainer.resumed_from} (left as it is): this run saves to {path}")
    save(trainer_state(trainer, epoch), path, previous=trainer.resumed_from)
    return path


def resume_trainer(trainer: Any, resume_file: PathLike) -> None:
    """RecBole's ``resume_checkpoint`` with one-line errors and the history restored."""
    resume_file = str(resume_file)
    ck = load(resume_file, map_location=trainer.device, trust=trusted(trainer.config))
    check_model_name(ck, trainer.config["model"], resume_file)
    load_model_state(trainer.model, ck, resume_file)
    load_optimizer_state(trainer.optimizer, ck, resume_file)
    trainer.start_epoch = int(ck["epoch"]) + 1
    trainer.cur_step = ck.get("cur_step", 0)
    trainer.best_valid_score = ck.get("best_valid_score", trainer.best_valid_score)
    history = ck.get(HISTORY_KEY)
    if isinstance(history, dict):
        restore_history(trainer, history)
        if trainer.valid_scores and len(trainer.valid_results) == len(trainer.valid_scores):
            best = best_index(trainer.valid_scores, trainer.valid_metric_bigger,
                              first=getattr(trainer, "selection_rule", "recbole") == "authors")
            trainer.best_valid_result = dict(trainer.valid_results[best])
    else:
        trainer.logger.warning(f"{resume_file} holds no epoch history (not saved by recbole_iisan): the result "
                               f"file counts only the epochs run after resuming")
    # until this run saves a better model (under a new name), the best model is the resumed file
    trainer.own_model_file = trainer.saved_model_file
    trainer.saved_model_file = resume_file
    trainer.resumed_from = resume_file
    trainer.logger.info(f"checkpoint {resume_file} loaded: resuming at epoch {trainer.start_epoch}; new "
                        f"checkpoints go to {resumed_name(trainer.own_model_file, resume_file)}")


def load_into_trainer(trainer: Any, path: PathLike) -> None:
    """The best model's parameters before a test evaluation (RecBole's ``load_best_model``)."""
    ck = load(path, map_location=trainer.device, trust=trusted(trainer.config))
    load_model_state(trainer.model, ck, path)
    trainer.logger.info(f"Loading model structure and parameters from {path}")


# --------------------------------------------------------------------------------------------
# the rolling "last" checkpoint: an interrupted run continues exactly where it stopped

LAST_KEY = "plugin_last_state"


def _rng_state(train_data: Any) -> dict:
    import random

    import numpy as np

    gen = getattr(train_data, "generator", None)
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "loader": gen.get_state() if gen is not None else None}


def _set_rng_state(state: dict, train_data: Any) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen = getattr(train_data, "generator", None)
    if gen is not None and state.get("loader") is not None:
        gen.set_state(state["loader"])


def save_last(trainer: Any, epoch: int, path: PathLike, train_data: Any) -> str:
    """The whole training state after epoch ``epoch`` (0-based): parameters, optimizer, patience,
    best score and result, per-epoch history, the best model's file and the random-number
    generators (torch, numpy, python, the training data loader's), written atomically."""
    state = {
        **trainer_state(trainer, epoch),
        LAST_KEY: {"best_valid_result": dict(trainer.best_valid_result or {}),
                   "best_model_file": str(trainer.saved_model_file),
                   "rng": _rng_state(train_data)},
    }
    save(state, path)
    return str(path)


def is_last_checkpoint(path: PathLike, trust: bool = False) -> bool:
    """Whether ``path`` holds a rolling state written by :func:`save_last` (a checkpoint of this
    version: from its metadata alone)."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return False
    if checkpoint_file.kind(p) == "safetensors":
        import json

        try:
            return LAST_KEY in json.loads(checkpoint_file.metadata(p).get("state", "{}"))
        except (checkpoint_file.FormatError, ValueError):
            return False  # load() says what is wrong with it
    return LAST_KEY in load(p, trust=trust)


def resume_last(trainer: Any, path: PathLike, train_data: Any) -> None:
    """Continue a run from its rolling state (:func:`save_last`): the next epoch, the same
    patience, best model file, history and random-number generators, so that the resumed run
    trains as the uninterrupted one would have (bitwise on one CPU thread)."""
    ck = load(path, map_location=trainer.device, trust=trusted(trainer.config))
    last = ck.get(LAST_KEY)
    if not isinstance(last, dict):
        raise CheckpointError(f"checkpoint {path}: not a rolling training state (no {LAST_KEY!r}); "
                              f"pass it as --resume=CHECKPOINT to continue from its epoch instead")
    check_model_name(ck, trainer.config["model"], path)
    load_model_state(trainer.model, ck, path)
    load_optimizer_state(trainer.optimizer, ck, path)
    trainer.start_epoch = int(ck["epoch"]) + 1
    trainer.cur_step = int(ck.get("cur_step", 0))
    trainer.best_valid_score = ck.get("best_valid_score", trainer.best_valid_score)
    history = dict(ck.get(HISTORY_KEY) or {})
    history.setdefault("train_loss", last.get("train_loss"))  # older rolling states kept the losses there
    restore_history(trainer, history)
    trainer.best_valid_result = dict(last.get("best_valid_result") or {}) or None
    best_file = last.get("best_model_file")
    if best_file:
        trainer.saved_model_file = str(best_file)
    _set_rng_state(last["rng"], train_data)
    trainer.resumed_from = str(path)  # RecBole's "save epoch -1" of a finished run writes nothing
    if trainer.cur_step > int(trainer.stopping_step or 0):  # it had stopped early: nothing left to train
        trainer.start_epoch = max(trainer.start_epoch, int(trainer.epochs))
    trainer.logger.info(f"resumed {path} at epoch {trainer.start_epoch} (best model: {trainer.saved_model_file})")
