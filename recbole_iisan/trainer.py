"""The Trainer every model of a plugin run uses (IISAN and RecBole's own models alike).

It is RecBole's ``Trainer`` with four additions, none of which changes RecBole's training:
- the optimizer takes ``model.param_groups()`` when a model defines it (IISAN's per-group
  learning rates, ``iisan_lr``), through RecBole's own ``_build_optimizer(params=...)`` hook;
- ``paper_protocol: True`` masks each user's history items at full ranking (the paper's
  protocol; RecBole's default ranks them);
- it records training-only seconds per epoch, evaluation seconds and the best epoch, which the
  run report and the benchmarks read;
- checkpoints go through ``recbole_iisan.checkpoint``: atomic saves, one line for a checkpoint
  that does not load, the per-epoch history saved and restored (a resumed run reports the whole
  run), and a run resumed from ``ck.pth`` saves to a new name, never over ``ck.pth``.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_iisan import checkpoint


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PluginTrainer(Trainer):
    """RecBole's Trainer + parameter groups, the paper's history masking and timings."""

    def __init__(self, config: Any, model: torch.nn.Module) -> None:
        super().__init__(config, model)
        self.train_epoch_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.valid_scores: list[float] = []
        self.valid_results: list[dict] = []
        self.resumed_from = None  # the checkpoint this run resumed from (never written)
        try:
            self.paper_protocol = bool(config["paper_protocol"])
        except KeyError:
            self.paper_protocol = False

    def _build_optimizer(self, **kwargs: Any) -> torch.optim.Optimizer:
        if "params" not in kwargs and hasattr(self.model, "param_groups"):
            groups = self.model.param_groups()
            kwargs["params"] = groups
            for g in groups:
                n = sum(p.numel() for p in g["params"])
                self.logger.info(f"optimizer group {g.get('name', '?')}: lr {g['lr']:g}, {n:,} parameters")
        return super()._build_optimizer(**kwargs)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        _sync(self.device)
        start = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        _sync(self.device)
        self.train_epoch_seconds.append(time.perf_counter() - start)
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        start = time.perf_counter()
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
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
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    @property
    def best_epoch(self) -> int:
        """0-based epoch of the best validation score (-1 before any validation)."""
        if not self.valid_scores:
            return -1
        return (checkpoint.best_index(self.valid_scores, self.valid_metric_bigger) + 1) * self.eval_step - 1

    def _full_sort_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        if self.paper_protocol:
            item_seq = interaction[self.model.ITEM_SEQ].to(scores.device)
            scores.scatter_(1, item_seq, -np.inf)  # history (pads hit column 0, already -inf)
        return interaction, scores, positive_u, positive_i
