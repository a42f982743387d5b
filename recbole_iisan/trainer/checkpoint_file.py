"""The bytes of a checkpoint: tensors in safetensors, everything else JSON; nothing is unpickled.

A checkpoint is one safetensors file (``<Model>-<time>.safetensors``). Its tensors are the
checkpoint's tensors, named by where they sit in the state (``state_dict/item_embedding.weight``,
``optimizer/state/0/exp_avg``, ``plugin_last_state/rng/torch``); its header's ``__metadata__``
(strings only, readable with ``safetensors.safe_open(path, "pt").metadata()``) holds:

- ``format``: ``recbole_iisan.checkpoint``, ``format_version``: ``1``;
- ``model``, ``dataset``: what was trained on what (read without loading a tensor);
- ``state``: the rest of the state as JSON, with ``{"__tensor__": name}`` where a tensor was,
  and tags for what JSON lacks: ``{"__float__": "inf"}``, ``{"__tuple__": [...]}``,
  ``{"__items__": [[key, value], ...]}`` (a dict with non-string keys, such as an optimizer's
  state), ``{"__ndarray__": name, "dtype": "<u4"}`` (numpy's random state).

Reading it needs ``json`` and ``safetensors`` only: no class is looked up, no code runs.

A checkpoint of RecBole or of recbole-iisan 0.1 is a torch zip holding a pickle (the whole
``Config``, the model class, enums): :mod:`.legacy_checkpoint` reads it with an allow-list, first
through torch's own ``torch.load(weights_only=True)`` (``torch.serialization.safe_globals``), and
where torch's restricted unpickler cannot parse the file (RecBole saves with ``pickle_protocol=4``,
whose ``FRAME`` / ``MEMOIZE`` / ``STACK_GLOBAL`` opcodes it does not implement, and it cannot list
every model class ahead) through a ``find_class`` unpickler holding the same allow-list. Any other
global (``os.system``, a class of unknown code) is refused before it is looked up;
``trust=True`` (``--trust_checkpoint``) loads the pickle as torch does with
``weights_only=False``, which runs whatever the file holds.
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "recbole_iisan.checkpoint"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
_MAX_HEADER = 100_000_000  # safetensors' own limit


class FormatError(Exception):
    """Why a file is not a readable checkpoint (one line; the caller names the file)."""


class UnsafePickle(pickle.UnpicklingError):
    """A legacy pickle refers to a global outside the allow-list."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


# --------------------------------------------------------------------------------------------
# the state <-> (tensors, JSON)

def _tensor_key(path: str, tensors: dict) -> str:
    key = path or "tensor"
    n = 1
    while key in tensors:
        n += 1
        key = f"{path}#{n}"
    return key


def encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data; its tensors (and numpy arrays) go into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = _tensor_key(path, tensors)
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = _tensor_key(path, tensors)
        kind = obj.dtype.kind
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj.astype(np.int64) if kind == "u" else obj))
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[encode(k, f"{path}/{i}k", tensors), encode(v, f"{path}/{k}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    raise FormatError(f"'{path.lstrip('/')}' holds a {type(obj).__name__}, which a checkpoint does not store "
                      f"(tensors, numbers, strings, lists and dicts only)")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__ndarray__" in obj:
        key = obj.get("__tensor__", obj.get("__ndarray__"))
        if key not in tensors:
            raise FormatError(f"damaged: its metadata refers to a tensor '{key}' that the file does not hold")
        if "__tensor__" in obj:
            return tensors[key]
        return tensors[key].numpy().astype(np.dtype(obj["dtype"]))
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors on one storage (safetensors refuses shared memory:
    tied weights are written twice and tied again by ``load_state_dict``)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def to_bytes(state: dict) -> bytes:
    """The safetensors bytes of a checkpoint state (``config`` is ``{"model", "dataset", "values"}``)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    body = {k: encode(v, k, tensors) for k, v in state.items()}
    config = state.get("config") or {}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": str(config.get("model", "")),
            "dataset": str(config.get("dataset", "")), "state": json.dumps(body, allow_nan=False)}
    return save(_unshared(tensors), metadata=meta)


# --------------------------------------------------------------------------------------------
# reading

def kind(path: Path) -> str:
    """``"safetensors"``, ``"zip"`` (a torch file: legacy pickle) or ``"other"``, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK"):
        return "zip"
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") <= _MAX_HEADER and head[8:9] == b"{":
        return "safetensors"
    return "other"


def header(path: Path) -> dict:
    """The safetensors header (JSON) of ``path``, checked against the file's size: FormatError
    ``truncated`` when the header or a tensor ends past the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise FormatError(f"truncated ({size:,} bytes, the end of the file is missing)")
        try:
            head = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"damaged (its safetensors header is not JSON: {exc})") from None
    if not isinstance(head, dict):
        raise FormatError("damaged (its safetensors header is not a mapping)")
    ends = [int(v["data_offsets"][1]) for k, v in head.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if ends and 8 + n + max(ends) > size:
        raise FormatError(f"truncated ({size:,} bytes, the end of the file is missing)")
    return head


def metadata(path: Path) -> dict:
    """The plugin's metadata of a safetensors checkpoint; FormatError if it is another file."""
    meta = header(path).get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise FormatError("a safetensors file, but not a RecBole training checkpoint of recbole_iisan (its "
                          "metadata has no 'format: recbole_iisan.checkpoint')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"written by a newer recbole_iisan (checkpoint format {meta.get('format_version')}, "
                          f"this version reads {FORMAT_VERSION}): upgrade recbole_iisan")
    return meta


def read(path: Path, map_location: Any = "cpu") -> dict:
    """The state of a safetensors checkpoint (no unpickling)."""
    from safetensors.torch import load_file

    meta = metadata(path)
    try:
        body = json.loads(meta["state"])
    except (KeyError, ValueError) as exc:
        raise FormatError(f"damaged (its metadata 'state' is not JSON: {exc})") from None
    device = str(map_location) if map_location is not None else "cpu"
    tensors = load_file(str(path), device=device)
    return {k: decode(v, tensors) for k, v in body.items()}
