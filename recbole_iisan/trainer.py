"""The Trainer every model of a plugin run uses (IISAN and RecBole's own models alike).

It is RecBole's ``Trainer`` with three additions, none of which changes RecBole's training:
- the optimizer takes ``model.param_groups()`` when a model defines it (IISAN's per-group
  learning rates, ``iisan_lr``), through RecBole's own ``_build_optimizer(params=...)`` hook;
- ``paper_protocol: True`` masks each user's history items at full ranking (the paper's
  protocol; RecBole's default ranks them);
- it records training-only seconds per epoch, evaluation seconds and the best epoch, which the
  run report and the benchmarks read.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from recbole.trainer import Trainer


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
        return score, result

    @property
    def best_epoch(self) -> int:
        """0-based epoch of the best validation score (-1 before any validation)."""
        if not self.valid_scores:
            return -1
        scores = np.asarray(self.valid_scores)
        idx = int(np.argmax(scores) if self.valid_metric_bigger else np.argmin(scores))
        return (idx + 1) * self.eval_step - 1

    def _full_sort_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        if self.paper_protocol:
            item_seq = interaction[self.model.ITEM_SEQ].to(scores.device)
            scores.scatter_(1, item_seq, -np.inf)  # history (pads hit column 0, already -inf)
        return interaction, scores, positive_u, positive_i
