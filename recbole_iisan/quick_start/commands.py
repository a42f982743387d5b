"""The plugin's small command lines: ``python -m recbole_iisan.prepare``, ``.download`` and
``.build_cache`` (thin modules at the package's top level call these ``main`` functions).

    python -m recbole_iisan.prepare --dataset Scientific --raw_dir /path/to/Dataset/Scientific \\
        --data_path dataset/ [--images am_image_is.zip] [--paper_protocol]
    python -m recbole_iisan.download --dataset Scientific [--images] [--data_path dataset/]
    python -m recbole_iisan.build_cache --dataset Scientific [--model IISANVA] \\
        [--config_files "a.yaml b.yaml"] [--shards N [--ray_address=ADDR]] [--key=value ...]

- ``prepare``: the authors' raw files (``am_*_users*.tsv`` + ``*_items.tsv``) -> RecBole atomic
  files (+ an LMDB image store with ``--images``). Without ``--raw_dir``: the raw files in
  ``<data_path>/<dataset>/raw`` (or ``<data_path>/<dataset>``); else, with ``--images``, only the
  images of an already-prepared dataset (or of RecBole's bundled ``ml-100k``); else the paper's
  datasets (Scientific, Instrument, Office) are downloaded first (:mod:`recbole_iisan.data.sources`).
- ``download``: the authors' two TSV files (GitHub at a pinned commit, sha256 checked) into
  ``<data_path>/<dataset>/raw/``, then ``prepare``; ``--images`` also fetches the authors' Google
  Drive zip (``gdown``). ``RECBOLE_IISAN_DATA_URL`` (a mirror URL or a local folder) replaces both.
- ``build_cache``: the config is built exactly as a run builds it (the same yaml files and
  ``--key=value`` parsing), then the run's preparation step (:func:`recbole_iisan.data.utils.prepare_inputs`)
  builds, resumes or reuses each tower's cache and prints ``<tower> TAB <folder>``.

Every one goes through :func:`recbole_iisan.utils.errors.run_cli`: bad input is one ``error:``
line (``<file>:<line>: <what was expected>`` for raw files) and exit code 2.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Optional, Sequence

from recbole_iisan.data.atomic_files import UNKNOWN_ITEM_POLICIES, PrepareError, import_dataset_images, prepare_dataset
from recbole_iisan.data.sources import ENV_URL, KNOWN_DATASETS
from recbole_iisan.utils.errors import run_cli
from recbole_iisan.utils.files import cli_logging

# --------------------------------------------------------------------------------------------
# prepare


def prepare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recbole_iisan.prepare",
        description="Turn an IISAN-format dataset (am_*_users*.tsv + *_items.tsv) into RecBole "
                    "atomic files <data_path>/<dataset>/<dataset>.inter/.item, and optionally "
                    "import item images into <data_path>/<dataset>/<dataset>_images.lmdb.")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. Scientific")
    p.add_argument("--raw_dir", help="folder with am_*_users*.tsv and *_items.tsv (omit to use "
                                     "<data_path>/<dataset>/raw, to download Scientific, "
                                     "Instrument or Office, or to import --images for an "
                                     "already-prepared dataset)")
    p.add_argument("--data_path", default="dataset/", help="RecBole data_path (default dataset/)")
    p.add_argument("--images", help="folder or .zip of <item_id>.jpg|.jpeg|.png to import")
    p.add_argument("--paper_protocol", action="store_true",
                   help="keep only each user's most recent max_seq_len+3 items (IISAN's "
                        "truncation; reproduces the paper's Table I counts)")
    p.add_argument("--min_seq_len", type=int, default=5,
                   help="skip users with fewer items (default 5)")
    p.add_argument("--max_seq_len", type=int, default=10,
                   help="with --paper_protocol, keep the last max_seq_len+3 items (default 10)")
    p.add_argument("--unknown_items", choices=UNKNOWN_ITEM_POLICIES, default="error",
                   help="item ids missing from the items file: error (default) or drop")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return p


def prepare_main(argv: Optional[List[str]] = None) -> int:
    """``python -m recbole_iisan.prepare``."""
    args = prepare_parser().parse_args(argv)
    cli_logging(args.quiet)
    options = dict(paper_protocol=args.paper_protocol, min_seq_len=args.min_seq_len,
                   max_seq_len=args.max_seq_len, unknown_items=args.unknown_items, force=args.force)

    def body() -> None:
        if args.raw_dir is None:
            _prepare_without_raw_dir(args, options)
        else:
            prepare_dataset(args.dataset, args.raw_dir, args.data_path, images=args.images, **options)

    return run_cli(body)


def _prepare_without_raw_dir(args: argparse.Namespace, options: dict) -> None:
    """No --raw_dir: raw files already beside the dataset (``<data_path>/<dataset>[/raw]``), else
    images for an already-prepared dataset (or ml-100k), else download a known dataset."""
    from recbole_iisan.data.sources import (download_and_prepare, is_known_dataset,
                                             local_raw_dir)

    raw = local_raw_dir(args.data_path, args.dataset)
    prepared = (Path(args.data_path) / args.dataset / f"{args.dataset}.inter").is_file()
    if raw is not None:
        prepare_dataset(args.dataset, raw, args.data_path, images=args.images, **options)
    elif args.images is not None and (prepared or not is_known_dataset(args.dataset)):
        import_dataset_images(args.dataset, args.data_path, args.images)
    elif not prepared and is_known_dataset(args.dataset):
        download_and_prepare(args.dataset, args.data_path, images=args.images, **options)
    else:
        raise PrepareError("expected --raw_dir (raw dataset folder) and/or --images")


# --------------------------------------------------------------------------------------------
# download


def download_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recbole_iisan.download",
        description=f"Download one of the IISAN paper's datasets ({', '.join(KNOWN_DATASETS)}) "
                    f"and prepare its RecBole atomic files. {ENV_URL} replaces the download "
                    f"source by a mirror URL or a local folder.")
    p.add_argument("--dataset", required=True, choices=list(KNOWN_DATASETS))
    p.add_argument("--data_path", default="dataset/", help="RecBole data_path (default dataset/)")
    p.add_argument("--images", action="store_true",
                   help="also fetch the authors' image zip (Google Drive) and import it")
    p.add_argument("--paper_protocol", action="store_true",
                   help="prepare with IISAN's truncation (last max_seq_len+3 items per user), "
                        "as prepare --paper_protocol")
    p.add_argument("--force", action="store_true", help="prepare again even when up to date")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return p


def download_main(argv: Optional[List[str]] = None) -> int:
    """``python -m recbole_iisan.download``."""
    args = download_parser().parse_args(argv)
    cli_logging(args.quiet)
    return run_cli(lambda: _download(args))


def _download(args: argparse.Namespace) -> int:
    from recbole_iisan.data.sources import download_and_prepare

    result = download_and_prepare(args.dataset, args.data_path, fetch_image_zip=args.images,
                                  paper_protocol=args.paper_protocol, force=args.force)
    line = (f"{args.dataset}: {result['users']:,} users, {result['items']:,} items, "
            f"{result['interactions']:,} interactions -> {result['inter_file']}")
    if "images" in result:
        img = result["images"]
        line += f"; images: {img.get('n_stored', 0):,} stored in {img.get('store_path')}"
    print(line)
    return 0


# --------------------------------------------------------------------------------------------
# build_cache


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
    from recbole_iisan.config.configurator import build_config, parse_overrides

    overrides = parse_overrides(rest)
    if args.data_path is not None:
        overrides.setdefault("data_path", args.data_path)
    if args.shards is not None:
        overrides["cache_shards"] = args.shards
    files = args.config_files.split() if args.config_files else None
    return build_config(args.model, args.dataset, files, overrides=overrides)


def build_cache_main(argv: Sequence[str] | None = None) -> int:
    """``python -m recbole_iisan.build_cache``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_cli(lambda: _build_cache(argv))


def _build_cache(argv: Sequence[str] | None) -> int:
    from recbole.utils import init_logger

    from recbole_iisan.data.cache.paths import cache_root
    from recbole_iisan.data.utils import prepare_inputs
    from recbole_iisan.utils.errors import PluginConfigError, disk_full_guard

    config = make_config(argv)
    init_logger(config)
    with disk_full_guard(lambda: cache_root(config)):  # a full disk: one line (DiskFullError is an OSError)
        paths = prepare_inputs(config)
    if not paths:
        raise PluginConfigError(f"model {config['model']} reads no encoder cache")
    for tower, path in paths.items():
        print(f"{tower}\t{path}")
    return 0
