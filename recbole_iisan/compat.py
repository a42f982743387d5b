"""Every shim that RecBole 1.2.1 needs on today's numpy / pandas / torch, in one place.

RecBole 1.2.1 predates torch 2.6, whose ``torch.load`` defaults to ``weights_only=True``.
RecBole's checkpoints pickle the whole ``Config`` (and with it the model class), so its own
reloads (``Trainer.evaluate(load_best_model=True)``, ``resume_checkpoint``,
``load_data_and_model``) fail with "Weights only load failed".  We give *only RecBole's
modules* a ``torch`` whose ``load`` defaults to ``weights_only=False``; the global
``torch.load`` is left untouched.  numpy<2 and pandas<3 are pinned (see setup.py), not shimmed.

``apply()`` is idempotent and is called when ``recbole_iisan`` is imported.
"""
from __future__ import annotations

import os
import types
import warnings
from typing import Any

import torch

_APPLIED = False


class _TorchWithTrustedLoad(types.ModuleType):
    """A stand-in for the ``torch`` module that forwards everything to torch, except that
    ``load`` defaults to ``weights_only=False`` (RecBole checkpoints are our own files)."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def apply() -> None:
    """Install the shims (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    # ray 2.6.3 (imported by recbole.quick_start) warns about pkg_resources on every import.
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
    # Ray workers re-import RecBole in fresh processes; the env var reaches them too.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import recbole.quick_start.quick_start as rb_quick_start
    import recbole.trainer.trainer as rb_trainer

    proxy = _TorchWithTrustedLoad()
    for module in (rb_trainer, rb_quick_start):
        module.torch = proxy  # type: ignore[attr-defined]
    _APPLIED = True
