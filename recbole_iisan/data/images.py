"""Item images in one LMDB store, keyed by item token.

:func:`import_images` reads a folder or a ``.zip`` of ``<item_id>.jpg|.jpeg|.png`` (extensions in
any case; in a zip or folder the files may sit in subfolders), checks that each file decodes with
PIL, and stores the *original encoded bytes* under the item token (UTF-8). Files that do not decode
are listed, not stored. The store is written to a temporary LMDB directory and renamed into place;
its ``__meta__`` key (JSON: source fingerprint, counts, the full report) is written last, so a
store with ``__meta__`` is complete. Importing again from the same source for the same items is a
no-op ("up to date").

:class:`ImageStore` reads a finished store (read-only, no locks; safe from several processes, and
it reopens itself after a ``fork`` or unpickling, e.g. in DataLoader workers).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import lmdb
from PIL import Image

from recbole_iisan.utils.errors import CacheError, ImageStoreError
from recbole_iisan.utils.files import PathLike, bundled_dataset_dir, setting

logger = logging.getLogger("recbole_iisan.images")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
META_KEY = b"__meta__"
STORE_FORMAT = "recbole_iisan.images/1"
MAP_SIZE = 1 << 40  # 1 TiB of address space; the file grows only as data is written
_COMMIT_EVERY = 512
#: what reading a damaged zip can raise: a bad header or CRC (BadZipFile), corrupt deflate data
#: (zlib.error), a member cut short (EOFError), an unsupported compression (NotImplementedError)
_ZIP_ERRORS = (OSError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError)
_VERIFY_BATCH = 64




def user_data_dir(dataset: str) -> Path:
    """The per-user folder for what cannot live beside a dataset:
    ``$XDG_CACHE_HOME/recbole_iisan/<dataset>`` (default ``~/.cache/recbole_iisan/<dataset>``)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "recbole_iisan" / dataset


def in_installed_package(path: PathLike) -> bool:
    """True for a path inside site-packages (RecBole reads its bundled ml-100k from there)."""
    return any(part in ("site-packages", "dist-packages") for part in Path(path).resolve().parts)


def default_image_store_path(data_path: PathLike, dataset: str) -> Path:
    """``<data_path>/<dataset>/<dataset>_images.lmdb`` (an LMDB environment directory), or, for a
    dataset RecBole reads from its installed package (``ml-100k``, whatever ``data_path`` says),
    ``user_data_dir(dataset)/<dataset>_images.lmdb``: never inside site-packages, and the same
    place for ``prepare --images`` and for the run."""
    folder = Path(data_path) / dataset
    if bundled_dataset_dir(dataset, data_path) is not None or in_installed_package(folder):
        return user_data_dir(dataset) / f"{dataset}_images.lmdb"
    return folder / f"{dataset}_images.lmdb"


@dataclass
class ImageImportReport:
    """What :func:`import_images` did. ``missing`` and ``n_items`` are known only when
    ``item_tokens`` was given (otherwise ``n_items`` is None and ``missing`` empty)."""

    source: str
    store_path: str
    n_files: int = 0                      # image files found in the source
    n_stored: int = 0
    n_items: Optional[int] = None
    missing: List[str] = field(default_factory=list)
    unreadable: List[Tuple[str, str]] = field(default_factory=list)
    extra: int = 0                        # files for items not in item_tokens (ignored)
    duplicates: int = 0                   # second files for the same token (ignored)
    up_to_date: bool = False

    @property
    def coverage(self) -> Optional[float]:
        if not self.n_items:
            return None
        return self.n_stored / self.n_items

    @property
    def report_file(self) -> str:
        return str(Path(self.store_path) / "report.txt")

    def summary(self) -> str:
        tail = f"{len(self.unreadable):,} unreadable"
        if self.n_items is not None:
            cov = 100.0 * self.n_stored / self.n_items if self.n_items else 0.0
            head = (f"images: {self.n_stored:,} of {self.n_items:,} items ({cov:.1f}%); "
                    f"{len(self.missing):,} missing, {tail}")
        else:
            head = f"images: {self.n_stored:,} stored; {tail}"
        if self.extra:
            head += f"; {self.extra:,} files for unknown items ignored"
        if self.duplicates:
            head += f"; {self.duplicates:,} duplicate files ignored"
        return f"{head} — see {self.report_file}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["unreadable"] = [list(u) for u in self.unreadable]
        d["coverage"] = self.coverage
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageImportReport":
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in names}
        kw["unreadable"] = [tuple(u) for u in kw.get("unreadable", [])]
        return cls(**kw)


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
def _token_of(name: str) -> Optional[str]:
    """Item token of an image member name (``a/b/B00X.JPG`` -> ``B00X``), or None to skip it."""
    p = PurePosixPath(name.replace("\\", "/"))
    if any(part == "__MACOSX" or part.startswith(".") for part in p.parts):
        return None  # macOS resource forks, hidden files
    if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.stem:
        return None
    return p.stem


class _Source:
    """A folder or a zip of image files: a fingerprint and (token, name) pairs."""

    def __init__(self, source: PathLike):
        self.path = Path(source)
        if not self.path.exists():
            raise ImageStoreError(f"{self.path}: image source not found (expected a folder or "
                                  f"a .zip of <item_id>.jpg|.jpeg|.png)")
        self.is_zip = self.path.is_file()
        if self.is_zip:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except _ZIP_ERRORS as exc:
                raise ImageStoreError(f"{self.path}: expected a folder or a .zip file, this zip cannot "
                                      f"be read (truncated or damaged?): {type(exc).__name__}: {exc}") \
                    from None
            names = [i.filename for i in self._zip.infolist() if not i.is_dir()]
        else:
            self._zip = None
            names = sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*")
                           if p.is_file())
        self.entries: List[Tuple[str, str]] = []
        for name in sorted(names):
            token = _token_of(name)
            if token is not None:
                self.entries.append((token, name))

    def fingerprint(self) -> dict:
        st = self.path.stat()
        if self.is_zip:
            return {"path": str(self.path.resolve()), "kind": "zip", "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns}
        h = hashlib.sha256()
        for _, name in self.entries:
            s = (self.path / name).stat()
            h.update(f"{name}\0{s.st_size}\0{s.st_mtime_ns}\n".encode("utf-8", "surrogatepass"))
        return {"path": str(self.path.resolve()), "kind": "folder", "files": len(self.entries),
                "sha256": h.hexdigest()}

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return (self.path / name).read_bytes()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _verify(data: bytes) -> Optional[str]:
    """None when ``data`` decodes to an RGB image, else the reason it does not."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB")
        return None
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        return f"{type(exc).__name__}: {exc}"


def _tokens_digest(item_tokens: Optional[Sequence[str]]) -> Optional[str]:
    if item_tokens is None:
        return None
    h = hashlib.sha256()
    for t in item_tokens:
        h.update(t.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def _read_meta(store_path: Path) -> Optional[dict]:
    if not (store_path / "data.mdb").is_file():
        return None
    try:
        key, env = _acquire_env(store_path)
    except (ImageStoreError, OSError):
        return None
    try:
        with env.begin() as txn:
            raw = txn.get(META_KEY)
        return json.loads(raw) if raw is not None else None
    except (lmdb.Error, ValueError):
        return None
    finally:
        _release_env(key)


def _write_report_file(report: ImageImportReport, path: Path) -> None:
    lines = [f"# {report.summary()}", f"# source: {report.source}"]
    lines += [f"unreadable\t{tok}\t{why}" for tok, why in report.unreadable]
    lines += [f"missing\t{tok}" for tok in report.missing]
    (path / "report.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def import_images(source: PathLike, store_path: PathLike,
                  item_tokens: Optional[Iterable[str]] = None,
                  progress: bool = True, force: bool = False) -> ImageImportReport:
    """Import a folder or ``.zip`` of ``<item_id>.jpg|.jpeg|.png`` into an LMDB store.

    Only files that decode with PIL are stored (their original bytes); the others go to
    ``report.unreadable``. With ``item_tokens``, only those items are stored and the report
    counts ``missing`` items and ``extra`` files. ``<store>/report.txt`` lists every unreadable
    and missing item. A complete store built from the same source for the same items is reused.
    """
    store = Path(store_path)
    tokens = None if item_tokens is None else list(dict.fromkeys(item_tokens))
    src = _Source(source)
    try:
        fingerprint = src.fingerprint()
        digest = _tokens_digest(tokens)
        if not force:
            meta = _read_meta(store)
            if (meta is not None and meta.get("format") == STORE_FORMAT
                    and meta.get("source") == fingerprint and meta.get("item_tokens") == digest):
                report = ImageImportReport.from_dict(meta["report"])
                report.store_path = str(store)
                report.up_to_date = True
                logger.info(f"{report.summary()} (up to date)")
                return report
        return _build(src, store, tokens, fingerprint, digest, progress)
    finally:
        src.close()


def _build(src: _Source, store: Path, tokens: Optional[List[str]], fingerprint: dict,
           digest: Optional[str], progress: bool) -> ImageImportReport:
    """Import ``src`` into a new LMDB store beside ``store``, then swap it in atomically."""
    report = ImageImportReport(source=str(src.path), store_path=str(store), n_files=len(src.entries),
                               n_items=None if tokens is None else len(tokens))
    todo = _select_entries(src, tokens, report)
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.parent / f".{store.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    env = lmdb.open(str(tmp), map_size=MAP_SIZE, subdir=True, readahead=False, metasync=False, sync=False)
    try:
        stored, txn = _import_entries(src, todo, env, report, progress, store.name)
        report.n_stored = len(stored)
        if tokens is not None:
            bad = {u for u, _ in report.unreadable}
            report.missing = [t for t in tokens if t not in stored and t not in bad]
        meta = {"format": STORE_FORMAT, "source": fingerprint, "item_tokens": digest,
                "n_stored": report.n_stored, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "report": report.as_dict()}
        txn.put(META_KEY, json.dumps(meta).encode("utf-8"))
        txn.commit()
        env.sync(True)
    except BaseException:
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    env.close()
    _write_report_file(report, tmp)
    # atomic swap: the final path is either the old complete store or the new one
    if store.exists():
        old = store.parent / f".{store.name}.old-{os.getpid()}"
        os.replace(store, old)
        os.replace(tmp, store)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, store)
    logger.info(report.summary())
    return report


def _select_entries(src: _Source, tokens: Optional[List[str]], report: ImageImportReport) -> List[Tuple[str, str]]:
    """The source's files to import: one per wanted item (extra files and duplicates counted)."""
    wanted = None if tokens is None else set(tokens)
    todo: List[Tuple[str, str]] = []
    seen = set()
    for token, name in src.entries:
        if wanted is not None and token not in wanted:
            report.extra += 1
        elif token in seen or token.encode("utf-8", "surrogatepass") == META_KEY:
            report.duplicates += 1
        else:
            seen.add(token)
            todo.append((token, name))
    return todo


def _import_entries(src: _Source, todo: List[Tuple[str, str]], env, report: ImageImportReport, progress: bool,
                    name: str):
    """Read and verify the files (threads decode), store the readable ones, record the others;
    returns ``(stored tokens, the open write transaction)``."""
    from tqdm.auto import tqdm

    stored = set()
    bar = tqdm(total=len(todo), desc=f"images -> {name}", unit="img", disable=not progress, leave=False)
    txn = env.begin(write=True)
    pending = 0
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        for start in range(0, len(todo), _VERIFY_BATCH):
            batch = todo[start:start + _VERIFY_BATCH]
            datas = []
            for _, file_name in batch:
                try:
                    datas.append(src.read(file_name))
                except _ZIP_ERRORS + (RuntimeError,) as exc:
                    datas.append(exc)  # recorded as unreadable, like a file PIL cannot decode
            reasons = pool.map(lambda d: d if isinstance(d, Exception) else _verify(d), datas)
            for (token, _), data, why in zip(batch, datas, reasons):
                if isinstance(why, Exception):
                    why = f"cannot read: {type(why).__name__}: {why}"
                if why is not None:
                    report.unreadable.append((token, why))
                    continue
                txn.put(token.encode("utf-8", "surrogatepass"), data)
                stored.add(token)
                pending += 1
                if pending >= _COMMIT_EVERY:
                    txn.commit()
                    txn = env.begin(write=True)
                    pending = 0
            bar.update(len(batch))
    bar.close()
    return stored, txn


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
# py-lmdb refuses to open one environment twice in a process, and (py-lmdb 3) also refuses to
# reopen in a forked child an environment that was open in the parent. So readers of one store
# share one handle per process, and every handle is closed just before a fork (readers reopen
# lazily afterwards, in the parent and in the child).
_ENVS: Dict[tuple, "lmdb.Environment"] = {}
_REFS: Dict[tuple, int] = {}
_ENVS_LOCK = threading.RLock()


def _env_key(path: Path) -> tuple:
    st = (path / "data.mdb").stat()
    return (str(path.resolve()), st.st_dev, st.st_ino)


def _get_env(key: tuple, path: Path) -> "lmdb.Environment":
    with _ENVS_LOCK:
        env = _ENVS.get(key)
        if env is None:
            try:
                env = lmdb.open(str(path), readonly=True, lock=False, subdir=True,
                                readahead=False, max_readers=2048)
            except lmdb.Error as exc:
                raise ImageStoreError(f"{path}: cannot open image store ({exc})") from None
            _ENVS[key] = env
        return env


def _acquire_env(path: Path) -> Tuple[tuple, "lmdb.Environment"]:
    key = _env_key(path)
    with _ENVS_LOCK:
        env = _get_env(key, path)
        _REFS[key] = _REFS.get(key, 0) + 1
        return key, env


def _release_env(key: tuple) -> None:
    with _ENVS_LOCK:
        n = _REFS.get(key, 0) - 1
        if n > 0:
            _REFS[key] = n
            return
        _REFS.pop(key, None)
        env = _ENVS.pop(key, None)
        if env is not None:
            env.close()


def _close_all_before_fork() -> None:
    _ENVS_LOCK.acquire()
    try:
        for env in _ENVS.values():
            env.close()
        _ENVS.clear()
    except BaseException:
        _ENVS_LOCK.release()
        raise


def _after_fork_in_parent() -> None:
    _ENVS_LOCK.release()


def _after_fork_in_child() -> None:
    global _ENVS_LOCK
    _ENVS_LOCK = threading.RLock()
    _ENVS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_all_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


class ImageStore:
    """Read-only access to a store made by :func:`import_images`.

    ``token in store``, ``len(store)``, ``store.keys()``, ``get_bytes``, ``get_image`` (RGB),
    ``get_images``. Opens without locks (the store never changes once complete); several
    processes may read one store. Handles are shared within a process, closed before ``fork``
    and reopened lazily, so a store object can be used in DataLoader workers (fork or spawn)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._key = None
        self._pid = None
        self._open()

    def _open(self) -> None:
        p = self.path
        if not (p / "data.mdb").is_file():
            raise ImageStoreError(f"{p}: not an image store (no LMDB data.mdb; build it with "
                                  f"`python -m recbole_iisan.prepare ... --images SOURCE`)")
        key, env = _acquire_env(p)
        try:
            with env.begin() as txn:
                raw = txn.get(META_KEY)
            if raw is None:
                raise ImageStoreError(f"{p}: incomplete image store (no {META_KEY.decode()} "
                                      f"key; import the images again)")
            try:
                self.meta = json.loads(raw)
            except ValueError:
                raise ImageStoreError(f"{p}: image store has an unreadable "
                                      f"{META_KEY.decode()} key") from None
        except BaseException:
            _release_env(key)
            raise
        self._key, self._pid = key, os.getpid()

    @property
    def env(self) -> "lmdb.Environment":
        if self._key is None or self._pid != os.getpid():
            self._key = None  # closed, or a reference inherited through fork
            self._open()
        return _get_env(self._key, self.path)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self._key = None
        self._pid = None
        self._open()

    def __len__(self) -> int:
        return int(self.meta.get("n_stored", self.env.stat()["entries"] - 1))

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and self.get_bytes(token) is not None

    def keys(self) -> List[str]:
        with self.env.begin() as txn:
            return [k.decode("utf-8", "surrogatepass")
                    for k in txn.cursor().iternext(keys=True, values=False) if k != META_KEY]

    def get_bytes(self, token: str) -> Optional[bytes]:
        key = token.encode("utf-8", "surrogatepass")
        if key == META_KEY:
            return None
        with self.env.begin(buffers=False) as txn:
            return txn.get(key)

    def get_image(self, token: str) -> Image.Image:
        data = self.get_bytes(token)
        if data is None:
            raise KeyError(token)
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")

    def get_bytes_many(self, tokens: Iterable[str]) -> List[Optional[bytes]]:
        """The stored bytes of each token (None where absent), read in one transaction."""
        out: List[Optional[bytes]] = []
        with self.env.begin(buffers=False) as txn:
            for token in tokens:
                key = token.encode("utf-8", "surrogatepass")
                out.append(None if key == META_KEY else txn.get(key))
        return out

    def get_images(self, tokens: Iterable[str]) -> List[Optional[Image.Image]]:
        out: List[Optional[Image.Image]] = []
        for data in self.get_bytes_many(tokens):
            if data is None:
                out.append(None)
            else:
                with Image.open(io.BytesIO(data)) as img:
                    out.append(img.convert("RGB"))
        return out

    def close(self) -> None:
        if self._key is not None and self._pid == os.getpid():
            _release_env(self._key)
        self._key = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "ImageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageStore({str(self.path)!r}, {self.meta.get('n_stored')} images)"


def check_missing_images(config, tower: str, missing: Sequence[str], total: int, zeros_give: str) -> None:
    """The one rule for the items of an image tower without an image (``missing_image``):
    ``error`` -> one line naming how many and the first; ``zeros`` -> they get ``zeros_give``
    (zero states, black images), said once in the log."""
    if not missing:
        return
    first = list(missing[:5])
    if str(setting(config, "missing_image")) != "zeros":
        raise CacheError(f"tower '{tower}': {len(missing)} of {total} items have no image (first: {first}); "
                         f"set missing_image: zeros to give them {zeros_give}")
    logging.getLogger().warning(f"tower '{tower}': {len(missing)} of {total} items have no image; they get "
                                f"{zeros_give} (missing_image: zeros). First: {first}")
