"""Build (or check) the frozen-encoder caches of a dataset before training.

    python -m recbole_iisan.build_cache --dataset Scientific [--model IISANVA] \\
        [--config_files "a.yaml b.yaml"] [--shards N [--ray_address=ADDR]] [--key=value ...]

The config is built exactly as a run builds it (``recbole_iisan.config.build_config``: the same
yaml files, the same ``--key=value`` parsing, so ``--data_path=DIR`` and ``--learning_rate=2e-4``
mean what they mean to ``run_recbole_iisan.py``; RecBole reads ``ml-100k`` from its bundled copy).
Then the run's preparation step (``quick_start.prepare_inputs``) builds, resumes or reuses each
tower's cache and prints ``<tower> TAB <folder>``. Problems print one ``error:`` line and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from recbole_iisan.errors import EXIT_USER_ERROR, UserError


def make_config(argv: Sequence[str] | None = None):
    """The RecBole Config of a ``build_cache`` command line (the run's config path)."""
    parser = argparse.ArgumentParser(prog="python -m recbole_iisan.build_cache",
                                     description="build the frozen-encoder caches of a dataset")
    parser.add_argument("--dataset", "-d", required=True)
    parser.add_argument("--model", "-m", default="IISANVA", help="the plugin model whose towers and layers to cache")
    parser.add_argument("--data_path", default=None, help="RecBole data_path (same as --data_path=DIR)")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--shards", type=int, default=None,
                        help="encoder worker processes (cache_shards); with --ray_address=ADDR Ray actors")
    args, rest = parser.parse_known_args(argv)
    import recbole_iisan  # noqa: F401  (compat shims)
    from recbole_iisan.config import build_config, parse_overrides

    overrides = parse_overrides(rest)
    if args.data_path is not None:
        overrides.setdefault("data_path", args.data_path)
    if args.shards is not None:
        overrides["cache_shards"] = args.shards
    files = args.config_files.split() if args.config_files else None
    return build_config(args.model, args.dataset, files, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from recbole.utils import init_logger

        from recbole_iisan.quick_start import prepare_inputs

        config = make_config(argv)
        init_logger(config)
        from recbole_iisan.checks import disk_full_guard
        from recbole_iisan.data.cache import cache_root

        with disk_full_guard(lambda: cache_root(config)):  # a full disk: one line (DiskFullError is an OSError)
            paths = prepare_inputs(config)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if not paths:
        print(f"error: model {config['model']} reads no encoder cache", file=sys.stderr)
        return EXIT_USER_ERROR
    for tower, path in paths.items():
        print(f"{tower}\t{path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
