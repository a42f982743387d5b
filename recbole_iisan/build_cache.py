"""Build (or check) the frozen-encoder caches of a dataset before training.

    python -m recbole_iisan.build_cache --dataset Scientific --data_path dataset/ \
        [--model IISANVA] [--config_files a.yaml b.yaml] [--shards N [--ray_address ADDR]] [--key=value ...]

Config = ``properties/overall.yaml`` + ``properties/<model>.yaml`` + ``properties/<dataset>.yaml``
(those that exist) + ``--config_files`` + ``--key=value`` overrides (values parsed as YAML), as a
plain dict (no RecBole Config, so the model class need not exist). ``--dataset ml-100k`` without
``--data_path`` uses RecBole's bundled copy. Problems print one line to stderr and exit with 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml



def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _load_yaml(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def build_config(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The plain-dict config of a command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m recbole_iisan.build_cache",
                                     description="build the frozen-encoder caches of a dataset")
    parser.add_argument("--dataset", "-d", required=True)
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--model", "-m", default=None)
    parser.add_argument("--config_files", nargs="+", default=[])
    parser.add_argument("--shards", type=int, default=None,
                        help="encoder worker processes (cache_shards); with --ray_address=ADDR Ray actors")
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            parser.error(f"unexpected argument {arg!r}: use --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value = rest[i + 1]
                i += 1
            else:
                value = "True"
        overrides[key] = _parse_value(value)
        i += 1
    from recbole_iisan.config import config_file_list

    user_files = [part.strip() for f in args.config_files for part in str(f).split(",") if part.strip()]
    config: dict[str, Any] = {}
    for f in config_file_list(args.model or "IISANVA", args.dataset, user_files):
        config.update(_load_yaml(Path(f)))
    config.update(overrides)
    if args.shards is not None:
        config["cache_shards"] = args.shards
    config["dataset"] = args.dataset
    if args.model:
        config["model"] = args.model
    if args.data_path is not None:
        config["data_path"] = args.data_path
    elif args.dataset == "ml-100k" and "data_path" not in overrides:
        import importlib.util

        spec = importlib.util.find_spec("recbole")
        config["data_path"] = str(Path(spec.origin).parent / "dataset_example")
    else:
        config.setdefault("data_path", "dataset/")
    config.setdefault("device", "cpu")
    from recbole_iisan.data.towers import resolve_towers

    resolve_towers(config)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from recbole_iisan.data.cache import CacheError, ensure_caches
    from recbole_iisan.data.encoders import EncoderLoadError
    from recbole_iisan.data.towers import TowerConfigError

    try:
        config = build_config(argv)
        paths = ensure_caches(config)
    except (CacheError, EncoderLoadError, TowerConfigError, OSError, ValueError) as exc:
        print(f"build_cache: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for tower, path in paths.items():
        print(f"{tower}\t{path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
