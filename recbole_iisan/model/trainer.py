"""RecBole trainer for IISAN: the paper's five optimiser groups (iisan-method.md 4.3).

:class:`IISANTrainer` is the plugin's :class:`~recbole_iisan.trainer.PluginTrainer` (RecBole's
``Trainer`` + timings + the paper's history masking) whose optimiser is built from
``model.param_groups()``. ``IISANBase.trainer_class`` points here; the run driver uses it.
"""
from __future__ import annotations

from recbole.trainer import Trainer

from recbole_iisan.trainer import PluginTrainer


class IISANTrainer(PluginTrainer):
    """Trainer whose optimiser uses ``model.param_groups()`` (per-group learning rates).

    RecBole's ``learner`` and ``weight_decay`` handling is kept (``weight_decay`` applies to
    every group); models without ``param_groups`` get RecBole's single group.
    """

    def _build_optimizer(self, **kwargs):
        if "params" not in kwargs and hasattr(self.model, "param_groups"):
            groups = self.model.param_groups()
            kwargs["params"] = groups
            for g in groups:
                n = sum(p.numel() for p in g["params"])
                self.logger.info(
                    f"optimizer group {g.get('name', '?'):<10} lr {g['lr']:g}, "
                    f"{len(g['params'])} tensors, {n:,} parameters"
                )
        return Trainer._build_optimizer(self, **kwargs)
