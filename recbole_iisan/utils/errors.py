"""The plugin's user-facing errors: one base class the command line catches.

Every error a user can fix (a bad config key or value, a missing or malformed file, an encoder
that cannot be loaded, a damaged cache or checkpoint) is a :class:`UserError`. Its message is one
line naming the file, line or key and what was expected; every command line goes through
:func:`run_cli`, which prints it as ``error: <message>`` and exits with :data:`EXIT_USER_ERROR`
(a full disk too, :class:`DiskFullError`). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input or a broken file that the user can fix; the message is one line."""

    def __str__(self) -> str:  # one line, whatever the message was built from
        return " ".join(super().__str__().split())


class PluginConfigError(UserError, ValueError):
    """A model, dataset or config value that cannot be used; the message says which and why."""


class TowerConfigError(PluginConfigError):
    """A tower is configured wrongly; the message names the key."""


class PrepareError(UserError, ValueError):
    """Bad raw input to ``prepare``: ``<file>:<line>: <what was expected>``."""


class ImageStoreError(PrepareError):
    """An image folder, zip or LMDB image store that cannot be read."""


class EncoderLoadError(UserError, RuntimeError):
    """An encoder cannot be found or loaded; the message names the config key."""


class CacheError(UserError, RuntimeError):
    """A hidden-state cache that is missing, stale, incomplete or damaged; names the folder."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or written; names the file."""


class DownloadError(UserError, RuntimeError):
    """A dataset file that could not be fetched or failed its checksum; names URL and file."""


class CacheDamagedError(CacheError):
    """A cache whose files fail their checks (header, sizes, per-value checksums); names the folder."""


# --------------------------------------------------------------------------------------------
# full disks

class DiskFullError(UserError, OSError):
    """No space left while writing; what was finished is kept."""


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
#: below this much free space an I/O error while writing is taken for a full disk (LMDB reports
#: a full disk as ``mdb_txn_commit: Input/output error``)
LOW_SPACE_BYTES = 64 * 2**20


def is_disk_full(exc: BaseException, path: Union[str, Path, None] = None) -> bool:
    """Whether ``exc`` is a write that failed for lack of space (ENOSPC / EDQUOT, LMDB's
    ``DiskError`` or an I/O error on a filesystem with almost no free space)."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    text = str(exc)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    try:
        import lmdb
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, lmdb.Error) or (isinstance(exc, OSError) and exc.errno == errno.EIO):
        if isinstance(exc, getattr(lmdb, "DiskError", ())):
            return True
        if "Input/output error" in text or (isinstance(exc, OSError) and exc.errno == errno.EIO):
            return _low_space(path)
    return False


def _low_space(path: Union[str, Path, None]) -> bool:
    if path is None:
        return False
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < LOW_SPACE_BYTES
    except OSError:
        return False


def disk_full_message(path: Union[str, Path, None]) -> str:
    return f"disk full while writing {path or 'a file'}: free space and re-run; finished work is kept"


@contextlib.contextmanager
def disk_full_guard(where: Union[str, Path, Callable[[], Any], None]) -> Iterator[None]:
    """Turn a full disk inside the block into :class:`DiskFullError` with one line naming the
    path (``where``, or a callable returning it, evaluated only on failure)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        path = getattr(exc, "filename", None)
        if path is None:
            try:
                path = where() if callable(where) else where
            except Exception:  # noqa: BLE001  (the message is what matters)
                path = None
        if is_disk_full(exc, path):
            raise DiskFullError(disk_full_message(path)) from exc
        raise


# --------------------------------------------------------------------------------------------
# the one wrapper of every command line

def run_cli(main: Callable[[], Optional[int]]) -> int:
    """Run a command line's body: a :class:`UserError`, a missing file or a full disk ends in one
    ``error: ...`` line on stderr and exit code 2; anything else keeps its traceback (a bug)."""
    try:
        return int(main() or 0)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        path = getattr(exc, "filename", None)
        if not is_disk_full(exc, path):
            raise
        print(f"error: {disk_full_message(path)}", file=sys.stderr)
        return EXIT_USER_ERROR
