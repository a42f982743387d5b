"""What identifies a cache's values: the identity record whose digest names the folder.

The identity covers everything that changes the stored values except the set of layers: weights
fingerprint, pooling, max length, fields, the items and their texts (or image digests), dtypes.
Two builds with equal identities store equal values, so a folder is reused when its identity is
the one asked for; any change gives another digest, so another folder.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

from recbole_iisan.towers import image_transform as _imgtf
from recbole_iisan.towers.spec import TowerSpec
from recbole_iisan.data.cache.layout import FORMAT_VERSION


def identity(spec: TowerSpec, info: Any, pooling: str, fingerprint: str, dataset_fp: str,
             dtype: str, encoder_dtype: str) -> dict[str, Any]:
    """The identity of one tower's cache (``info``: its encoder's ``EncoderInfo``; ``fingerprint``
    of the weights; ``dataset_fp`` of the items and their texts or images)."""
    ident: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "tower_kind": spec.kind,
        "weights_fingerprint": fingerprint,
        "model_type": info.model_type,
        "n_layers": info.n_layers,
        "dim": info.dim,
        "pooling": pooling,
        "dataset_fingerprint": dataset_fp,
        "dtype": dtype,
        "encoder_dtype": encoder_dtype,
    }
    if spec.is_image:
        ident["image_preprocessing"] = _imgtf.preprocessing_identity(dict(spec.extra).get("image_backend", "pil"))
    else:
        ident["max_length"] = int(spec.max_length)
        ident["fields"] = list(spec.fields)
    return ident


def digest(ident: Mapping[str, Any]) -> str:
    """The 12-hex digest that ends the folder's name."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def text_fingerprint(tokens: Sequence[str], texts: Sequence[str]) -> str:
    """sha256 over the (token, text) pairs, in token order."""
    h = hashlib.sha256()
    for tok, text in sorted(zip(tokens, texts)):
        h.update(tok.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\n")
    return h.hexdigest()


def _image_bytes(store: Any, token: str) -> bytes | None:
    for attr in ("get_bytes", "get_raw", "raw", "get_image_bytes"):
        fn = getattr(store, attr, None)
        if callable(fn):
            return fn(token)
    return None


def image_fingerprint(store: Any, tokens: Sequence[str]) -> str:
    """sha256 over the tokens and each one's image bytes (or, if the store cannot give raw bytes,
    its decoded pixels)."""
    h = hashlib.sha256()
    for tok in sorted(tokens):
        data = _image_bytes(store, tok)
        if data is None:
            img = store.get_image(tok)
            data = img.tobytes() + repr(img.size).encode()
        h.update(tok.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def store_path(store: Any) -> str:
    """Where an image store lives (its ``repr`` when it does not say)."""
    for attr in ("path", "store_path", "_path"):
        p = getattr(store, attr, None)
        if p is not None:
            return str(p)
    return repr(store)


__all__ = ["digest", "identity", "image_fingerprint", "store_path", "text_fingerprint"]
