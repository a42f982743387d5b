"""``python -m recbole_iisan.prepare``: raw IISAN-format dataset -> RecBole atomic files
(+ optional LMDB image store).

    python -m recbole_iisan.prepare --dataset Scientific --raw_dir /path/to/Dataset/Scientific \\
        --data_path dataset/ [--images am_image_is.zip] [--paper_protocol]

Without ``--raw_dir``: the raw files in ``<data_path>/<dataset>/raw`` (or ``<data_path>/<dataset>``)
are used; otherwise, with ``--images``, only the images are imported, for the items of an
already-prepared dataset (or of RecBole's bundled ``ml-100k``); otherwise the paper's datasets
(Scientific, Instrument, Office) are downloaded first (``recbole_iisan.data.download``).
Errors in the input print one line (``<file>:<line>: <what was expected>``) and exit with 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from recbole_iisan.data.prepare import (UNKNOWN_ITEM_POLICIES, PrepareError,
                                        import_dataset_images, prepare_dataset)
from recbole_iisan.utils import cli_logging
from recbole_iisan.errors import UserError


def build_parser() -> argparse.ArgumentParser:
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cli_logging(args.quiet)
    options = dict(paper_protocol=args.paper_protocol, min_seq_len=args.min_seq_len,
                   max_seq_len=args.max_seq_len, unknown_items=args.unknown_items,
                   force=args.force)
    try:
        if args.raw_dir is None:
            _prepare_without_raw_dir(args, options)
        else:
            prepare_dataset(args.dataset, args.raw_dir, args.data_path, images=args.images,
                            **options)
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def _prepare_without_raw_dir(args: argparse.Namespace, options: dict) -> None:
    """No --raw_dir: raw files already beside the dataset (``<data_path>/<dataset>[/raw]``), else
    images for an already-prepared dataset (or ml-100k), else download a known dataset."""
    from recbole_iisan.data.download import (download_and_prepare, is_known_dataset,
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


if __name__ == "__main__":
    sys.exit(main())
