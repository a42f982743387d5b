"""The Trainer every model of a plugin run uses (IISAN and RecBole's own models alike).

It is RecBole's ``Trainer`` with four additions, none of which changes RecBole's training:
- the optimizer takes ``model.param_groups()`` when a model defines it (IISAN's per-group
  learning rates, ``iisan_lr``), through RecBole's own ``_build_optimizer(params=...)`` hook;
- ``mask_history: True`` gives every item of the user's history before the target (validation:
  every training item; test: the training items and the validation item; the whole history, not
  only the input window) score -inf at full ranking, for every sequential model (IISAN, SASRec,
  GRU4Rec ...): a repeat target can then never be a hit, as in the paper. Default: False under
  RecBole's protocol, True under ``paper_protocol`` (see :func:`apply_protocol_defaults`);
- ``paper_protocol: True`` also selects the epoch and stops early on ``Hit@10`` unless the user
  set ``valid_metric``;
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
from recbole_iisan.utils import config_get as _config_get


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: what ``paper_protocol: True`` changes when the user did not set the key (iisan-method.md 4.4, 5)
PAPER_PROTOCOL_DEFAULTS = {"mask_history": True, "valid_metric": "Hit@10", "stopping_step": 10}


def user_set(config: Any, key: str) -> bool:
    """Whether the user gave ``key`` (command line, ``config_dict`` or a config file of their own)
    rather than the plugin's yaml files. A user file that repeats the plugin's default value
    counts as not given."""
    for layer in ("cmd_config_dict", "variable_config_dict"):
        if key in (getattr(config, layer, None) or {}):
            return True
    files = getattr(config, "file_config_dict", None) or {}
    if key not in files:
        return False
    from recbole_iisan.config import _file_dicts

    plugin = _file_dicts(getattr(config, "plugin_files", []) or [])
    return key not in plugin or plugin[key] != files[key]


def apply_protocol_defaults(config: Any) -> None:
    """Resolve the protocol-dependent defaults in place (idempotent).

    ``mask_history: ~`` (the yaml default) becomes ``paper_protocol``; under the paper protocol
    ``valid_metric`` becomes ``Hit@10`` and ``stopping_step`` 10 unless the user set them."""
    paper = bool(_config_get(config, "paper_protocol", False))
    if _config_get(config, "mask_history", None) is None:
        config["mask_history"] = paper
    if paper:
        for key, value in PAPER_PROTOCOL_DEFAULTS.items():
            if key != "mask_history" and not user_set(config, key):
                config[key] = value
        from recbole_iisan.config import check_metrics

        check_metrics(config)  # Hit@10 must be computed (metrics x topk): one line otherwise


class PluginTrainer(Trainer):
    """RecBole's Trainer + parameter groups, the paper's history masking and timings."""

    def __init__(self, config: Any, model: torch.nn.Module) -> None:
        apply_protocol_defaults(config)
        super().__init__(config, model)
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
        self._eval_dataset = eval_data._dataset if eval_data else None
        chunk = int(self.config["ranking_chunk_items"] or 0)
        if chunk > 0 and eval_data and eval_data.__class__.__name__ == "FullSortEvalDataLoader":
            # top-k over item chunks: memory bounded by users x chunk, not users x n_items
            from recbole_iisan.ranking import evaluate_full_sort_streaming

            self.model.eval()
            return evaluate_full_sort_streaming(self, eval_data, chunk_items=chunk,
                                                history=self.history_ids if self.mask_history else None)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    @property
    def best_epoch(self) -> int:
        """0-based epoch of the best validation score (-1 before any validation)."""
        if not self.valid_scores:
            return -1
        return (checkpoint.best_index(self.valid_scores, self.valid_metric_bigger) + 1) * self.eval_step - 1

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
            from recbole_iisan.errors import PluginConfigError

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
