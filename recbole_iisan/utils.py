"""Small helpers shared by the plugin's modules."""
from __future__ import annotations

from typing import Any


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]``, or ``default`` when the key is absent or ``None``.

    Works on a RecBole ``Config`` (which raises ``KeyError`` for unknown keys only in some
    versions and returns ``None`` in others) and on a plain dict alike."""
    try:
        value = config[key]
    except KeyError:
        return default
    return default if value is None else value
