"""The Trainer every model of a plugin run uses (IISAN and RecBole's own models alike).

It is RecBole's ``Trainer`` with these additions, none of which changes RecBole's training:
- the optimizer takes ``model.param_groups()`` when a model defines it (IISAN's per-group
  learning rates, ``iisan_lr``), through RecBole's own ``_build_optimizer(params=...)`` hook; with
  ``fused_optimizer: True`` RecBole's Adam / AdamW runs torch's fused kernel (:func:`with_fused_kernel`);
- ``mask_history: True`` gives every item of the user's history before the target (validation:
  every training item; test: the training items and the validation item; the whole history, not
  only the input window) score -inf at full ranking, for every sequential model (IISAN, SASRec,
  GRU4Rec ...): a repeat target can then never be a hit, as in the paper. Default: False under
  RecBole's protocol, True under ``paper_protocol`` (``config.resolve_protocol``);
- ``selection_rule: authors`` (the default under ``paper_protocol``) selects the first epoch whose
  unrounded validation score is strictly higher than every earlier one, as the authors' code; RecBole
  (``recbole``) keeps the later of two epochs whose 4-decimal rounded scores tie;
- every evaluation keeps each user's value of every top-k metric (:class:`RecordingEvaluator`),
  which the run writes beside its result file for paired tests between models;
- with ``last_checkpoint_file``, the whole training state (model, optimizer, patience, history,
  random-number generators) is saved after every validation, so an interrupted run resumes exactly
  where it stopped (:func:`recbole_iisan.trainer.checkpoint.resume_last`);
- it records training-only seconds per epoch, evaluation seconds and the best epoch, which the
  run report and the benchmarks read;
- checkpoints go through ``recbole_iisan.trainer.checkpoint``: safetensors + JSON (``<Model>-<time>.safetensors``:
  loading one runs no code), atomic saves, one line for a checkpoint that does not load, the
  per-epoch history saved and restored (a resumed run reports the whole run), and a run resumed
  from ``ck.safetensors`` saves to a new name, never over it.
"""
from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from recbole.evaluator import Evaluator
from recbole.evaluator.base_metric import TopkMetric
from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_iisan.trainer import checkpoint
from recbole_iisan.trainer.checkpoint_file import SUFFIX
from recbole_iisan.utils.compat import strict_improvement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


FUSABLE = (torch.optim.Adam, torch.optim.AdamW)


def with_fused_kernel(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer (groups, learning rates, hyper-parameters) with torch's fused kernel
    (``fused=True``: the update of every parameter in one pass instead of a loop of per-tensor ops;
    the same update up to rounding) when it is Adam or AdamW, has no state yet and every parameter is
    a floating-point tensor the kernel takes; otherwise, or where this torch has no such kernel, the
    optimizer unchanged. Adam's step on IISAN's ~4M parameters: ~0.25x the CPU time of the loop
    (``results/speed/step_speed.md``)."""
    if type(optimizer) not in FUSABLE or optimizer.state:
        return optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return optimizer
    groups = [{**g, "fused": True, "foreach": None} for g in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults hold a key its __init__ sets
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    try:
        fused = type(optimizer)(groups, **{**defaults, "fused": True, "foreach": None})
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device in this torch
        return optimizer
    fused.register_step_post_hook(_mark_updated)
    return fused


def _mark_updated(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """The fused kernel updates the parameters without bumping their version counters (torch 2.x);
    the caches keyed on them (the item table, the folded heads) must see every update."""
    from torch.autograd.graph import increment_version

    for g in optimizer.param_groups:
        for p in g["params"]:
            increment_version(p)


class RecordingEvaluator(Evaluator):
    """RecBole's ``Evaluator``, keeping each evaluated user's value of every top-k metric (the
    values RecBole averages and rounds: ``per_user["hit@10"]`` is ``[n_users]``, in the order of
    the evaluation data) and their unrounded means (``unrounded``)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.per_user: dict[str, np.ndarray] = {}
        self.unrounded: dict[str, float] = {}

    def evaluate(self, dataobject):
        self.per_user, result = {}, OrderedDict()
        for name in self.metrics:
            metric = self.metric_class[name]
            if not isinstance(metric, TopkMetric):
                result.update(metric.calculate_metric(dataobject))
                continue
            captured: dict[str, np.ndarray] = {}
            own = metric.topk_result  # (metric name, [n_users, max k] per-user values) -> averaged dict

            def capture(m: str, value: np.ndarray, own=own, captured=captured) -> dict:
                captured[m] = value
                return own(m, value)

            metric.topk_result = capture
            try:
                result.update(metric.calculate_metric(dataobject))
            finally:
                del metric.topk_result
            for m, value in captured.items():
                for k in metric.topk:
                    self.per_user[f"{m}@{k}"] = np.asarray(value[:, k - 1], dtype=np.float64)
        self.unrounded = {k: float(v.mean()) if v.size else 0.0 for k, v in self.per_user.items()}
        return result


class PluginTrainer(Trainer):
    """RecBole's Trainer + parameter groups, the paper's history masking and timings."""

    def __init__(self, config: Any, model: torch.nn.Module, checkpoint_file: Optional[str] = None,
                 last_checkpoint_file: Optional[str] = None) -> None:
        from recbole_iisan.config.protocol import resolve_protocol

        resolve_protocol(config)  # idempotent: a config built elsewhere gets the protocol's defaults too
        super().__init__(config, model)
        self.evaluator = RecordingEvaluator(config)
        if checkpoint_file:
            self.saved_model_file = str(checkpoint_file)
        else:  # RecBole's <Model>-<time> name, with the extension of what is written (checkpoint_file.py)
            self.saved_model_file = str(Path(self.saved_model_file).with_suffix(SUFFIX))
        #: where the whole training state is saved after every validation (``--resume`` continues it)
        self.last_checkpoint_file = last_checkpoint_file
        self.selection_rule = str(config["selection_rule"])
        self.mask_history = bool(config["mask_history"])
        self._eval_dataset = None
        self.train_epoch_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.valid_scores: list[float] = []
        self.valid_results: list[dict] = []
        self.resumed_from = None  # the checkpoint this run resumed from (never written)

    def _build_optimizer(self, **kwargs: Any) -> torch.optim.Optimizer:
        if "params" not in kwargs and hasattr(self.model, "param_groups"):
            groups = self.model.param_groups()
            kwargs["params"] = groups
            for g in groups:
                n = sum(p.numel() for p in g["params"])
                self.logger.info(f"optimizer group {g.get('name', '?')}: lr {g['lr']:g}, {n:,} parameters")
        optimizer = super()._build_optimizer(**kwargs)
        return with_fused_kernel(optimizer) if self.config["fused_optimizer"] else optimizer

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        _sync(self.device)
        start = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        _sync(self.device)
        self.train_epoch_seconds.append(time.perf_counter() - start)
        return loss

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's ``fit``, with the selection rule of ``selection_rule`` and, when
        ``last_checkpoint_file`` is set, the whole training state saved after every validation."""

        def after_validation(epoch_idx: int, valid_score: float) -> None:
            if self.last_checkpoint_file and (self.config["single_spec"] or self.config["local_rank"] == 0):
                checkpoint.save_last(self, epoch_idx, self.last_checkpoint_file, train_data)
            if callback_fn is not None:
                callback_fn(epoch_idx, valid_score)

        with strict_improvement(self.selection_rule == "authors"):
            return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                               callback_fn=after_validation)

    def _valid_epoch(self, valid_data, show_progress=False):
        start = time.perf_counter()
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        if self.selection_rule == "authors" and self.config["single_spec"]:
            # the unrounded mean over users (RecBole rounds to 4 places; DDP ranks hold a part of the users)
            score = self.evaluator.unrounded.get(self.valid_metric, score)
        self.eval_seconds.append(time.perf_counter() - start)
        self.valid_scores.append(float(score))
        self.valid_results.append({k: float(v) for k, v in (result or {}).items()})
        return score, result

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        path = checkpoint.save_trainer(self, epoch, kwargs.pop("saved_model_file", None))
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    def resume_checkpoint(self, resume_file):
        checkpoint.resume_trainer(self, resume_file)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            checkpoint.load_into_trainer(self, model_file or self.saved_model_file)
        self._eval_dataset = eval_data._dataset if eval_data else None
        chunk = int(self.config["ranking_chunk_items"] or 0)
        if chunk > 0 and eval_data and eval_data.__class__.__name__ == "FullSortEvalDataLoader":
            # top-k over item chunks: memory bounded by users x chunk, not users x n_items
            from recbole_iisan.evaluator.ranking import evaluate_full_sort_streaming

            self.model.eval()
            return evaluate_full_sort_streaming(self, eval_data, chunk_items=chunk,
                                                history=self.history_ids if self.mask_history else None)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    @property
    def best_epoch(self) -> int:
        """0-based epoch of the best validation score (-1 before any validation)."""
        if not self.valid_scores:
            return -1
        best = checkpoint.best_index(self.valid_scores, self.valid_metric_bigger, first=self.selection_rule == "authors")
        return (best + 1) * self.eval_step - 1

    @property
    def converged(self) -> bool:
        """False when the best epoch is within ``stopping_step`` epochs of the epoch cap: the run
        did not stop early and may still be improving."""
        return not (self.valid_scores and self.epochs - (self.best_epoch + 1) < int(self.stopping_step or 0))

    def _full_sort_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        if self.mask_history and batched_data[1] is None:  # (non-sequential models: RecBole masks already)
            self.mask_user_history(scores, interaction)
        return interaction, scores, positive_u, positive_i

    def mask_user_history(self, scores: torch.Tensor, interaction) -> None:
        """``scores[b, i] = -inf`` for every item i of row b's user before its target (its whole
        history, the first ``history_length`` items of the user's sequence), in place."""
        hist = self.history_ids(interaction)
        if hist is not None:
            scores.scatter_(1, hist.to(scores.device), -np.inf)  # pads hit column 0, already -inf

    def history_ids(self, interaction) -> torch.Tensor | None:
        """``[B, longest history]`` item ids of each row's user before its target, 0-padded
        (None when no row has a history)."""
        from recbole_iisan.data.dataset import HISTORY_LENGTH_FIELD

        history = getattr(self._eval_dataset, "user_history", None)
        if history is None or HISTORY_LENGTH_FIELD not in interaction:
            from recbole_iisan.utils.errors import PluginConfigError

            raise PluginConfigError("mask_history: True needs the plugin's sequential dataset "
                                    "(recbole_iisan.data.dataset.ProtocolSequentialDataset), which holds the "
                                    "users' histories; set --mask_history=False for this dataset")
        uid = interaction[self.config["USER_ID_FIELD"]].to(history.device)
        hlen = interaction[HISTORY_LENGTH_FIELD].to(history.device)
        if hlen.numel() == 0 or int(hlen.max()) == 0:
            return None
        ar = torch.arange(int(hlen.max()))[None, :]  # [1, longest history of the batch]
        start = self._eval_dataset.user_history_offset[uid][:, None]
        hist = history[(start + ar).clamp_max(len(history) - 1)]  # [B, longest]
        return hist.masked_fill(ar >= hlen[:, None], 0)
