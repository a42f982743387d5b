"""``python -m recbole_iisan.download``: fetch one of the paper's datasets and prepare it.

    python -m recbole_iisan.download --dataset Scientific [--images] [--data_path dataset/] \\
        [--paper_protocol]

Fetches the authors' two TSV files (github.com/GAIR-Lab/IISAN at a pinned commit, sha256
checked) into ``<data_path>/<dataset>/raw/`` and prepares the RecBole atomic files as
``python -m recbole_iisan.prepare`` does. ``--images`` also fetches the authors' Google-Drive zip
of item images (``gdown``) and imports it into ``<data_path>/<dataset>/<dataset>_images.lmdb``
as ``prepare --images`` does. ``RECBOLE_IISAN_DATA_URL`` (a mirror URL or a local folder)
replaces GitHub and Google Drive. Errors print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from recbole_iisan.data.download import ENV_URL, KNOWN_DATASETS
from recbole_iisan.utils import cli_logging


def build_parser() -> argparse.ArgumentParser:
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cli_logging(args.quiet)
    from recbole_iisan.data.download import download_and_prepare
    from recbole_iisan.errors import EXIT_USER_ERROR, UserError

    try:
        result = download_and_prepare(args.dataset, args.data_path, fetch_image_zip=args.images,
                                      paper_protocol=args.paper_protocol, force=args.force)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    line = (f"{args.dataset}: {result['users']:,} users, {result['items']:,} items, "
            f"{result['interactions']:,} interactions -> {result['inter_file']}")
    if "images" in result:
        img = result["images"]
        line += f"; images: {img.get('n_stored', 0):,} stored in {img.get('store_path')}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
