"""Small helpers shared by the plugin's modules: config access and atomic file writes."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, "os.PathLike[str]"]


def properties_dir() -> Path:
    """The plugin's yaml defaults: ``properties/`` installed as package data
    (``recbole_iisan/properties``: pip install . or a wheel), else the checkout's top-level folder
    (the source); the first that holds ``overall.yaml``."""
    package = Path(__file__).resolve().parents[1]  # recbole_iisan/
    candidates = (package / "properties", package.parent / "properties")
    return next((c for c in candidates if (c / "overall.yaml").is_file()), candidates[0])


#: datasets RecBole ships inside its package; RecBole reads them from there whatever data_path says
RECBOLE_BUNDLED = ("ml-100k",)


def bundled_dataset_dir(dataset: str, data_path: PathLike) -> Path | None:
    """RecBole's bundled copy of ``dataset`` (``ml-100k``) when ``data_path`` holds no copy of its
    own, else None: the one place that knows about RecBole's bundled datasets."""
    if dataset not in RECBOLE_BUNDLED or (Path(data_path) / dataset / f"{dataset}.inter").is_file():
        return None
    import importlib.util

    spec = importlib.util.find_spec("recbole")
    return Path(spec.origin).parent / "dataset_example" / dataset if spec and spec.origin else None


def optional(config: Any, key: str) -> Any:
    """``config[key]``, or None when absent: for the per-tower keys (``text2_pooling``), which exist
    only for the towers a user names and fall back to a yaml key (``pooling``)."""
    return config[key] if key in getattr(config, "final_config_dict", config) else None


def setting(config: Any, key: str) -> Any:
    """``config[key]`` of a key whose default lives in the plugin's yaml files (``properties/``):
    one clear line when it is absent (a config not built by ``build_config``), instead of a
    second default here. Works on a RecBole ``Config`` (which answers None for any absent key)
    and on a plain dict alike."""
    present = key in getattr(config, "final_config_dict", config)
    if not present:
        from recbole_iisan.utils.errors import PluginConfigError

        raise PluginConfigError(f"config key '{key}' is not set: its default lives in the plugin's yaml files "
                                f"(properties/); build the config with recbole_iisan.config.build_config")
    return config[key]


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file in the target folder, fsync it, then rename it into
    place: a reader sees the old file or the new one, never half of one. Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _finite(obj: Any) -> Any:
    """JSON has no NaN / Infinity: non-finite floats become ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    """Strict JSON (non-finite floats written as null), written atomically."""
    text = json.dumps(_finite(obj), indent=indent, sort_keys=False, default=str, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cli_logging(quiet: bool = False) -> None:
    """Logging of the plugin's small command-line tools (prepare, download): INFO to stdout."""
    import logging
    import sys

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%d %b %H:%M", stream=sys.stdout)
