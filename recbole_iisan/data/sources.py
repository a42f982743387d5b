"""The IISAN paper's datasets fetch themselves: Scientific, Instrument, Office.

The authors publish each dataset as two header-less TSV files in their repository
(github.com/GAIR-Lab/IISAN, folder ``Dataset/<Name>/``); :func:`fetch_raw_dataset` downloads them
from the commit pinned in :data:`UPSTREAM_COMMIT` with ``requests``, resumably: the bytes go to
``<file>.part`` in the target folder; a dropped connection is retried (:data:`RETRIES` times, then
on the next run) from the end of the ``.part`` file with an HTTP ``Range: bytes=N-`` request and
appended; a server that ignores the range (200 instead of 206, or a ``Content-Range`` that does not
start at N) restarts the file from zero. The whole file is checked against the sha256 of
:data:`KNOWN_DATASETS` only then and renamed into place; a resumed file that fails its sha256 is
fetched once more from zero (the ``.part`` may be from another version of the file), and a file
that fails it again is deleted with one line. A file whose sha256 is not known here (Office's
items file) is accepted, its sha256 is logged and recorded in ``<dest>/sources.json``; a file at
the final name that cannot be verified (wrong sha256, or unknown hash and no matching record) is
deleted and fetched again, so a leftover or corrupted file is never taken for a complete one.

Images (:func:`fetch_images`) are the authors' Google-Drive zips, fetched with ``gdown``
(``resume=True``: an interrupted download continues from its ``.part`` file with an HTTP range
request); their sha256 is logged and recorded.

``RECBOLE_IISAN_DATA_URL`` replaces the upstream base (``.../Dataset``) by a mirror URL or a local
folder: files are looked up at ``<base>/<Name>/<file>``, or at ``<base>/<file>`` when the base
itself ends with ``/<Name>`` (or, for a local folder, when the file is there). A local folder is
copied and verified exactly like a download. With the variable set, the image zip is taken from
the same place instead of Google Drive.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from recbole_iisan.utils.errors import DownloadError
from recbole_iisan.utils.files import PathLike, atomic_write_json

logger = logging.getLogger("recbole_iisan.download")


UPSTREAM_COMMIT = "67f5c1faf12a1f9fc3258922bb05684561532d1d"
UPSTREAM_URL = f"https://raw.githubusercontent.com/GAIR-Lab/IISAN/{UPSTREAM_COMMIT}/Dataset"
ENV_URL = "RECBOLE_IISAN_DATA_URL"
RECORD_FILE = "sources.json"
RAW_SUBDIR = "raw"
RETRIES = 2
#: seconds without a byte before a transfer counts as dropped
TIMEOUT_S = 60
DRIVE_URL = "https://drive.google.com/file/d/{id}"


@dataclass(frozen=True)
class KnownDataset:
    """One of the paper's datasets: its two TSV files (name -> sha256, ``None`` when unknown here)
    and the Google-Drive zip of its images."""

    name: str
    files: Mapping[str, Optional[str]]
    image_zip: str
    drive_id: str


KNOWN_DATASETS: Dict[str, KnownDataset] = {
    "Scientific": KnownDataset(
        "Scientific",
        {"Industrial_and_Scientific_items.tsv":
            "96cecc1b60b3f8a858b3b07c98dc577a32ff4d1fa32e7bc4b466a9e95b84f8aa",
         "am_Industrial_and_Scientific_users.tsv":
            "1cc801daba6bb7af4e1f2ed4506231d489b1445e58f8ea3e1d399ac9e14846b2"},
        "am_image_is.zip", "1vXLls-2DvvkMfgiCv3nB8C29nu0NDdt3"),
    "Instrument": KnownDataset(
        "Instrument",
        {"Musical_Instruments_items.tsv":
            "bd91547b58df5434de782336c54ffa80f8a83ce59f2811287dcfba555016645f",
         "am_Musical_Instruments_users_10K.tsv":
            "d6c2d2a4e7108423c14014820abf47f90969b8655e9655b2963c793ad3f24e4b"},
        "am_image_mi.zip", "1icKbl3ltN28WDESSKOdhOA0pNWIiNxe0"),
    "Office": KnownDataset(
        "Office",
        {"Office_Products_items.tsv": None,  # sha256 not known here: accepted, logged, recorded
         "am_Office_Products_users_10K.tsv":
            "f4110e9783e7de772711777eda4f375bb5d37419a65012d15149f013633989a4"},
        "am_image_op.zip", "1zl-RbSNwUmQicCB3w1xY9RQWN8vGg5pC"),
}


def is_known_dataset(dataset: str) -> bool:
    return dataset in KNOWN_DATASETS


def known_dataset(dataset: str) -> KnownDataset:
    try:
        return KNOWN_DATASETS[dataset]
    except KeyError:
        raise DownloadError(f"dataset {dataset!r} cannot be downloaded: known datasets are "
                            f"{', '.join(KNOWN_DATASETS)}") from None


def raw_dir_for(data_path: PathLike, dataset: str) -> Path:
    """Where downloaded raw files go: ``<data_path>/<dataset>/raw``."""
    return Path(data_path) / dataset / RAW_SUBDIR


# --------------------------------------------------------------------------------------------
# where a file comes from
# --------------------------------------------------------------------------------------------
def _is_url(base: str) -> bool:
    return "://" in base and not base.startswith("file://")


def _base(base_url: Optional[str]) -> str:
    base = base_url if base_url is not None else os.environ.get(ENV_URL) or UPSTREAM_URL
    if base.startswith("file://"):
        base = base[len("file://"):]
    return base.rstrip("/") if _is_url(base) else str(Path(base).expanduser())


def source_of(dataset: str, fname: str, base_url: Optional[str] = None) -> str:
    """The URL or local path ``fname`` of ``dataset`` is fetched from (see the module docstring)."""
    base = _base(base_url)
    if _is_url(base):
        return f"{base}/{fname}" if base.rsplit("/", 1)[-1] == dataset else f"{base}/{dataset}/{fname}"
    folder = Path(base)
    if folder.name == dataset or (not (folder / dataset / fname).exists()
                                  and (folder / fname).exists()):
        return str(folder / fname)
    return str(folder / dataset / fname)


def _manual_hint(dataset: str, names: str) -> str:
    return (f"without internet, get {names} by hand and pass --raw_dir=<folder holding them> "
            f"(or set {ENV_URL} to a mirror URL or local folder); see dataset/README.md")


# --------------------------------------------------------------------------------------------
# the record of what was fetched (sha256 of files without a known hash)
# --------------------------------------------------------------------------------------------
def _read_record(dest: Path) -> dict:
    import json

    try:
        data = json.loads((dest / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _drop_unverifiable(dest: Path, fname: str, known: Optional[str], record: dict) -> None:
    """Delete ``dest/fname`` unless it is verifiably complete: its sha256 is the known one, or
    (no known hash) the one recorded when it was fetched. A partial or corrupted file is never
    kept under its final name."""
    path = dest / fname
    if not path.is_file():
        return
    actual = _sha256(path)
    expected = known or (record.get(fname) or {}).get("sha256")
    if actual == expected:
        return
    why = ("its sha256 does not match" if expected else
           f"it is not recorded in {RECORD_FILE} as a complete download")
    logger.warning(f"{path}: {why}; deleting it and fetching it again")
    path.unlink()


class _ChecksumError(Exception):
    """A fetched file's sha256 is not the known one (``actual``)."""

    def __init__(self, actual: str):
        super().__init__(actual)
        self.actual = actual


class DroppedTransfer(OSError):
    """A transfer that stopped before its end (the bytes so far are in the ``.part`` file)."""


def _dropped() -> tuple:
    """The errors of a transfer that stopped half-way (requests' and urllib3's own)."""
    import requests
    import urllib3

    return (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError,
            urllib3.exceptions.TimeoutError)


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _http_to_part(url: str, part: Path, progress: bool) -> None:
    """Append the bytes of ``url`` the ``.part`` file lacks (``Range: bytes=<size>-``); restart
    it from zero when the server ignores the range. Raises requests' errors on a dropped transfer
    (the bytes received so far stay in ``part``)."""
    import requests
    from tqdm.auto import tqdm

    have = part.stat().st_size if part.is_file() else 0
    headers = {"Accept-Encoding": "identity"}  # a range counts the bytes as sent: no compression
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as r:
        if have and r.status_code == 416:  # nothing after byte N: the .part is already whole
            return
        r.raise_for_status()
        resumed = have and r.status_code == 206 and \
            r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        if have and not resumed:
            logger.info(f"{url}: the server ignored the range request; fetching the file from the start")
            have = 0
        total = int(r.headers.get("Content-Length") or 0) + have
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total or None, initial=have, unit="B", unit_scale=True, disable=not progress,
                     desc=part.name[:-len(".part")], leave=False) as bar:
            # read1: every byte that arrived is written, up to the moment the connection drops
            read = getattr(r.raw, "read1", None) or r.raw.read
            for chunk in iter(lambda: read(1 << 16), b""):
                f.write(chunk)
                bar.update(len(chunk))


def _fetch_to_part(src: str, part: Path, progress: bool, retries: int) -> None:
    """The whole of ``src`` (a URL, or a local file copied) in ``part``; a dropped connection is
    retried ``retries`` times, each from where the last one stopped."""
    import requests

    if not _is_url(src):
        shutil.copyfile(src, part)
        return
    for attempt in range(retries + 1):
        try:
            _http_to_part(src, part, progress)
            return
        except requests.exceptions.HTTPError as exc:
            if exc.response is None or exc.response.status_code < 500 or attempt == retries:
                raise
        except _dropped() as exc:
            if attempt == retries:
                raise DroppedTransfer(_reason(exc)) from exc
        size = part.stat().st_size if part.is_file() else 0
        logger.info(f"{src}: transfer interrupted at {size:,} bytes; resuming (retry {attempt + 1}/{retries})")


def _fetch_file(src: str, path: Path, known: Optional[str], progress: bool, retries: int) -> str:
    """``src`` -> ``path``, verified; returns its sha256. Raises :class:`_ChecksumError` (the
    ``.part`` deleted) or the transfer's error (the ``.part`` kept for the next run)."""
    part = _part(path)
    resumed = part.is_file() and part.stat().st_size > 0
    if resumed:
        logger.info(f"{part}: resuming after {part.stat().st_size:,} bytes")
    _fetch_to_part(src, part, progress, retries)
    sha = _sha256(part)
    if known is not None and sha != known and resumed:
        logger.warning(f"{path.name}: the resumed file fails its sha256; fetching it again from the start")
        part.unlink()
        _fetch_to_part(src, part, progress, retries)
        sha = _sha256(part)
    if known is not None and sha != known:
        part.unlink()
        raise _ChecksumError(sha)
    os.replace(part, path)
    return sha


def _reason(exc: BaseException) -> str:
    """A short, one-line reason for a failed fetch."""
    import requests
    import urllib3

    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason or ''}".strip()
    if isinstance(exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)):
        return "timed out"
    if isinstance(exc, DroppedTransfer):
        return str(exc)
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return "the connection dropped mid-file"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "cannot connect (offline?)"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# the TSV files
# --------------------------------------------------------------------------------------------
def fetch_raw_dataset(dataset: str, dest_dir: PathLike, base_url: Optional[str] = None,
                      files: Optional[Mapping[str, Optional[str]]] = None,
                      progress: bool = True, retries: Optional[int] = None) -> Path:
    """Download (or verify) the two raw TSV files of ``dataset`` into ``dest_dir``; returns
    ``dest_dir``. ``files`` (name -> sha256 or ``None``) replaces the built-in table (tests,
    mirrors of other datasets); ``base_url`` replaces ``$RECBOLE_IISAN_DATA_URL`` / upstream.

    Raises :class:`DownloadError` (one line: what, from where, the manual alternative) when a
    file cannot be fetched or fails its checksum; nothing unverified is left under its name."""
    import requests

    table = dict(files) if files is not None else dict(known_dataset(dataset).files)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    record = _read_record(dest)
    for fname, known in table.items():
        _drop_unverifiable(dest, fname, known, record)

    sources = {fname: source_of(dataset, fname, base_url) for fname in table}
    changed = False
    for fname, known in table.items():
        src = sources[fname]
        path = dest / fname
        if path.is_file():
            continue
        logger.info(f"fetching {dataset} file {fname} from {src}")
        t0 = time.perf_counter()
        try:
            sha = _fetch_file(src, path, known, progress, RETRIES if retries is None else retries)
        except _ChecksumError as exc:
            raise DownloadError(
                f"{fname} of {dataset} from {src} failed its checksum (sha256 {exc.actual}, expected "
                f"{known}): the file was corrupted or changed and was not kept; "
                f"{_manual_hint(dataset, fname)}") from None
        except (requests.exceptions.RequestException, OSError) as exc:
            part = _part(path)
            kept = (f"; {part.stat().st_size:,} bytes kept in {part.name}, the next run resumes"
                    if part.is_file() and part.stat().st_size else "")
            raise DownloadError(f"could not fetch {fname} of {dataset} from {src} "
                                f"({_reason(exc)}{kept}); {_manual_hint(dataset, ' and '.join(table))}") \
                from None
        changed = True
        size = path.stat().st_size
        if known is None:
            logger.warning(f"{fname}: no known sha256 to check it against; fetched "
                           f"{size:,} bytes with sha256 {sha} (recorded in "
                           f"{dest / RECORD_FILE})")
        logger.info(f"{fname}: {size:,} bytes, sha256 ok, in {time.perf_counter() - t0:.1f} s "
                    f"-> {path}")
        record[fname] = {"source": src, "sha256": sha, "size": size,
                         "verified": known is not None,
                         "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if changed:
        atomic_write_json(dest / RECORD_FILE, record)
    return dest


# --------------------------------------------------------------------------------------------
# the image zip
# --------------------------------------------------------------------------------------------
def fetch_images(dataset: str, dest_dir: PathLike, base_url: Optional[str] = None,
                 quiet: bool = False) -> Path:
    """The authors' image zip of ``dataset`` (a path to the ``.zip``).

    Default: ``gdown`` from Google Drive into ``dest_dir`` (``resume=True``). With
    ``$RECBOLE_IISAN_DATA_URL`` (or ``base_url``) set: from ``<base>[/<Name>]/<zip>`` instead,
    with gdown for a URL and in place for a local folder. The sha256 is logged and recorded in
    ``<dest_dir>/sources.json``."""
    spec = known_dataset(dataset)
    dest = Path(dest_dir)
    env = base_url if base_url is not None else os.environ.get(ENV_URL)
    if env and not _is_url(_base(env)):
        path = Path(source_of(dataset, spec.image_zip, env))
        if not path.is_file():
            raise DownloadError(f"could not fetch {spec.image_zip} of {dataset} from {path} "
                                f"(file not found; {ENV_URL}={env}); put the zip there, or pass "
                                f"--images=<zip> to python -m recbole_iisan.prepare")
        _log_zip(dataset, path, str(path), dest)
        return path
    url = source_of(dataset, spec.image_zip, env) if env else None
    where = url or DRIVE_URL.format(id=spec.drive_id)
    out = dest / spec.image_zip
    dest.mkdir(parents=True, exist_ok=True)
    try:
        import gdown

        if not out.is_file():
            logger.info(f"fetching {dataset} images {spec.image_zip} from {where} with gdown "
                        f"(an interrupted download resumes from its .part file)")
        if url:
            gdown.download(url=url, output=str(out), quiet=quiet, resume=True)
        else:
            gdown.download(id=spec.drive_id, output=str(out), quiet=quiet, resume=True)
    except Exception as exc:  # gdown raises its own, requests' and OSError alike
        raise DownloadError(f"could not fetch {spec.image_zip} of {dataset} from {where} "
                            f"({_reason(exc)}); download it by hand from "
                            f"{DRIVE_URL.format(id=spec.drive_id)} and pass --images=<zip> to "
                            f"python -m recbole_iisan.prepare") from None
    if not out.is_file():
        raise DownloadError(f"could not fetch {spec.image_zip} of {dataset} from {where} "
                            f"(gdown wrote no file {out})")
    _log_zip(dataset, out, where, dest)
    return out


def _log_zip(dataset: str, path: Path, source: str, dest: Path) -> None:
    record = _read_record(dest)
    st = path.stat()
    old = record.get(path.name) or {}
    if old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and old.get("sha256"):
        sha = old["sha256"]
    else:
        sha = _sha256(path)
        dest.mkdir(parents=True, exist_ok=True)
        record[path.name] = {"source": source, "sha256": sha, "size": st.st_size,
                             "mtime_ns": st.st_mtime_ns, "verified": False,
                             "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(dest / RECORD_FILE, record)
    logger.info(f"{dataset} images {path} ({st.st_size:,} bytes): sha256 {sha} (no known hash to "
                f"check against; recorded in {dest / RECORD_FILE})")


# --------------------------------------------------------------------------------------------
# download, then prepare as ``python -m recbole_iisan.prepare`` does
# --------------------------------------------------------------------------------------------
def download_and_prepare(dataset: str, data_path: PathLike, images: Optional[PathLike] = None,
                         fetch_image_zip: bool = False, paper_protocol: bool = False,
                         force: bool = False, **prepare_kwargs: Any) -> dict:
    """Fetch the raw files of a known dataset into ``<data_path>/<dataset>/raw`` (and, with
    ``fetch_image_zip``, its image zip), then :func:`~recbole_iisan.data.atomic_files.prepare_dataset`
    (which imports ``images`` into the LMDB store as ``prepare --images`` does)."""
    from recbole_iisan.data.atomic_files import prepare_dataset

    raw = fetch_raw_dataset(dataset, raw_dir_for(data_path, dataset))
    if fetch_image_zip:
        images = fetch_images(dataset, raw)
    return prepare_dataset(dataset, raw, data_path, images=images, paper_protocol=paper_protocol,
                           force=force, **prepare_kwargs)


def local_raw_dir(data_path: PathLike, dataset: str) -> Optional[Path]:
    """``<data_path>/<dataset>/raw`` or ``<data_path>/<dataset>`` when it holds both raw files."""
    from recbole_iisan.data.atomic_files import ITEMS_GLOB, USERS_GLOB

    for d in (raw_dir_for(data_path, dataset), Path(data_path) / dataset):
        if d.is_dir() and any(d.glob(USERS_GLOB)) and any(d.glob(ITEMS_GLOB)):
            return d
    return None
