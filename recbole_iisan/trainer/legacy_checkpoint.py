"""Checkpoints of RecBole and of recbole-iisan 0.1: a torch zip holding a pickle, read with an
allow-list so that loading one runs no code from the file.

What such a file holds: the checkpoint dict (tensors, numbers, lists), the whole RecBole ``Config``
(``recbole.config.configurator.Config`` or the plugin's ``PluginConfig``) with the model class
(``config.model_class``), ``yaml.loader.FullLoader`` (``config.yaml_loader``), RecBole's enums
(``ModelType``, ``InputType``, ``EvaluatorType``), ``torch.device``, numpy scalars (a best score)
and, in a rolling last state, numpy's random state (an ``ndarray``).

:data:`ALLOWED` maps each global such a pickle may name to what the unpickler gets instead:

- torch's tensor and storage rebuilders, ``torch.Size``, ``torch.device``, torch dtypes,
  ``collections.OrderedDict``, ``_codecs.encode`` (bytes in protocol 2): torch's own
  ``weights_only`` allow-list;
- numpy's ``_reconstruct``, ``ndarray``, ``dtype`` (and ``numpy.dtypes.*``), ``scalar``: arrays and
  scalars, as torch's documentation allows them;
- ``recbole.utils.enum_type.*`` enums: a value looked up in an enum;
- ``Config``, ``PluginConfig``, ``yaml.loader.FullLoader`` and any class under ``recbole.model.``
  or ``recbole_iisan.`` (the model class): **inert stand-ins** (:class:`Inert`), which hold the
  pickled attributes as data and run none of RecBole's or the plugin's code.

Every other global is refused by name before it is looked up (:class:`~.checkpoint_file.UnsafePickle`).
"""
from __future__ import annotations

import collections
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recbole_iisan.trainer.checkpoint_file import UnsafePickle


class Inert:
    """Stands in for a class of a legacy pickle: any construction gives an object that keeps the
    pickled attributes (``state``) and does nothing else."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
            state = state[0]
        self.state = dict(state) if isinstance(state, dict) else {}

    def __reduce__(self):  # never pickled again as the class it stands for
        return (dict, (self.state,))


def _exact() -> dict[str, Any]:
    from numpy._core import multiarray

    import recbole.utils.enum_type as enums

    out: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "_codecs.encode": __import__("_codecs").encode,
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}._reconstruct"] = multiarray._reconstruct
        out[f"{mod}.scalar"] = multiarray.scalar
    out.update({f"numpy.dtypes.{n}": getattr(np.dtypes, n) for n in dir(np.dtypes)
                if isinstance(getattr(np.dtypes, n), type) and issubclass(getattr(np.dtypes, n), np.dtype)})
    out.update({f"torch.{n}": getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)})
    import enum

    out.update({f"recbole.utils.enum_type.{n}": getattr(enums, n) for n in dir(enums)
                if isinstance(getattr(enums, n), type) and issubclass(getattr(enums, n), enum.Enum)})
    return out


#: globals replaced by :class:`Inert`: exact names, and the module prefixes of model classes
INERT_NAMES = ("recbole.config.configurator.Config", "recbole_iisan.config.configurator.PluginConfig",
               "recbole_iisan.config.PluginConfig", "yaml.loader.FullLoader")
INERT_PREFIXES = ("recbole.model.", "recbole_iisan.")

_ALLOWED: dict[str, Any] | None = None


def allowed(name: str) -> Any:
    """What the unpickler gets for the global ``name`` (``module.qualname``); UnsafePickle if none."""
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _exact()
    if name in _ALLOWED:
        return _ALLOWED[name]
    if name in INERT_NAMES or (name.startswith(INERT_PREFIXES) and name.rsplit(".", 1)[-1][:1].isupper()):
        return Inert
    raise UnsafePickle(name)


class AllowListUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come from :func:`allowed` only."""

    def find_class(self, module: str, name: str) -> Any:
        return allowed(f"{module}.{name}")


#: what ``torch.load(pickle_module=...)`` needs of a pickle module
restricted_pickle = types.ModuleType("recbole_iisan_allow_list_pickle")
restricted_pickle.Unpickler = AllowListUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = lambda f, **kw: AllowListUnpickler(f, **kw).load()  # type: ignore[attr-defined]
restricted_pickle.__version__ = pickle.format_version  # type: ignore[attr-defined]


def safe_globals() -> list:
    """The allow-list in the form ``torch.serialization.safe_globals`` takes: ``(object, name)``
    for every exact name and every inert stand-in name (a model class under ``recbole.model.`` or
    ``recbole_iisan.`` cannot be listed ahead: :func:`read_legacy` admits it by name)."""
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _exact()
    return [(obj, name) for name, obj in _ALLOWED.items()] + [(Inert, name) for name in INERT_NAMES]


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global"
                                 r"|unsupported GLOBAL (\S+) whose module \S+ is blocked")
_UNSUPPORTED_OPCODE = re.compile(r"Unsupported operand \d+")


def read_legacy(path: Path, map_location: Any = "cpu", trust: bool = False) -> Any:
    """The object in a torch pickle file: ``torch.load(weights_only=True)`` with the allow-list
    (:func:`safe_globals`); when torch's restricted unpickler cannot parse the file (protocol 4,
    which RecBole's ``Trainer`` writes: ``FRAME`` / ``MEMOIZE`` / ``STACK_GLOBAL`` opcodes) or the
    file names a model class, the same allow-list through :class:`AllowListUnpickler`. A global
    outside the allow-list raises :class:`UnsafePickle`. ``trust``: torch's plain
    ``weights_only=False`` load, which runs whatever the file holds."""
    # an open file, not the path: torch >= 2.10 reads a path ending in ``.safetensors`` as
    # safetensors whatever its bytes are
    with open(path, "rb") as f:
        if trust:
            return torch.load(f, map_location=map_location, weights_only=False)
        try:
            if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: the allow-list unpickler only
                raise pickle.UnpicklingError("Unsupported operand 0 (no torch.serialization.safe_globals)")
            with torch.serialization.safe_globals(safe_globals()), warnings.catch_warnings():
                # torch notes that its restricted unpickler may not read protocol 4: handled below
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            text = str(exc)
            unsupported = _UNSUPPORTED_GLOBAL.search(text)
            if unsupported:
                allowed(_builtin_name(unsupported.group(1) or unsupported.group(2)))  # UnsafePickle unless a model class
            elif not _UNSUPPORTED_OPCODE.search(text):
                raise
        f.seek(0)
        # torch's weights_only=True cannot take a pickle_module; the globals this load can reach are
        # the allow-list's (AllowListUnpickler.find_class), so nothing outside it is looked up or called
        return torch.load(f, map_location=map_location, weights_only=False, pickle_module=restricted_pickle)


def _builtin_name(name: str) -> str:
    """torch prints ``builtins.eval`` as ``eval``: the pickle's own name back."""
    return name if "." in name else f"builtins.{name}"


def config_state(config: Any) -> dict:
    """The attributes of a legacy ``Config`` (an :class:`Inert` stand-in, or the real object of a
    trusted load) as a dict."""
    if isinstance(config, Inert):
        return config.state
    return dict(getattr(config, "__dict__", {}) or {})
