"""Before a build: reuse a tower's folder, resume it, or remove it first.

A folder whose stored layers cover the request is reused (only the asked-for rows are read); one
that does not is rebuilt with the union of both layer sets (``cache_rebuild: auto``) or refused
(``cache_rebuild: never``); a damaged one is rebuilt under ``auto`` (the log says why) and
refused in one line naming the folder under ``never``. An incomplete folder (a build that was
killed) whose values pass their checks is resumed.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

from recbole_iisan.data.cache.integrity import check_manifest, damaged, lmdb_header, verify_cache
from recbole_iisan.data.cache.layout import DATA, MANIFEST, is_complete, read_manifest
from recbole_iisan.utils.errors import CacheError

logger = logging.getLogger("recbole_iisan.cache")


def _checked_old_manifest(folder: Path, ident: Mapping[str, Any], complete: bool) -> dict[str, Any]:
    """The manifest of an existing folder, after everything that identifies its values is checked."""
    old = read_manifest(folder)
    check_manifest(folder, old)
    if old.get("identity") != ident:
        raise damaged(folder, f"its {MANIFEST} identity differs from the settings its name stands for")
    if complete:
        verify_cache(folder)
    elif (folder / DATA).exists():
        lmdb_header(folder)
    return old


def _plan(folder: Path, ident: Mapping[str, Any], layers: list[int]) -> tuple[bool, list[int], str | None]:
    """For a folder with a manifest: ``(reuse it as it is, the layers to store, why it must be
    removed first or None)``."""
    complete = is_complete(folder)
    try:
        old = _checked_old_manifest(folder, ident, complete)
    except CacheError as exc:
        return False, layers, str(exc)
    old_layers = [int(x) for x in old["layers"]]
    if set(layers) <= set(old_layers):
        return complete, old_layers, None  # reuse it, or resume an interrupted build
    why = f"cache {folder.name} stores layers {old_layers}, model needs {layers}"
    return False, sorted(set(layers) | set(old_layers)) if complete else layers, why


def _discard(folder: Path, why: str, policy: str, then: str) -> None:
    """Remove an unusable folder (``cache_rebuild: auto``) or refuse (``never``)."""
    if policy == "never":
        raise CacheError(f"{why} and cache_rebuild is 'never': set cache_rebuild: auto or delete {folder}")
    logger.warning(f"{why}: {then}")
    shutil.rmtree(folder)


def _explain_others(root: Path, prefix: str, ident: Mapping[str, Any], target: Path) -> None:
    """Log why other caches of the same tower and encoder are not used."""
    for other in sorted(root.glob(prefix + "*")):
        if other == target or not (other / MANIFEST).is_file():
            continue
        try:
            old = read_manifest(other).get("identity", {})
        except CacheError:
            continue
        diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        if diff:
            logger.info(f"cache {other.name} is for other settings (differs in {', '.join(diff)}): not used")


def prepare_folder(folder: Path, prefix: str, ident: Mapping[str, Any], layers: list[int], policy: str,
                   tower: str) -> list[int] | None:
    """None when ``folder`` is complete and covers ``layers`` (reuse it); else the layers to store,
    with the folder created (a damaged, stale or foreign one removed first)."""
    store_layers = layers
    if (folder / MANIFEST).is_file():
        reuse, store_layers, why = _plan(folder, ident, layers)
        if reuse:
            logger.info(f"cache {tower}: reusing {folder} (stores hidden states {store_layers}, "
                        f"model reads {layers}; every value verified)")
            return None
        if why is not None:
            _discard(folder, why, policy, f"rebuilding {folder} with hidden states {store_layers}")
    elif (folder / DATA).exists():
        _discard(folder, f"cache {folder} has a {DATA} but no {MANIFEST}", policy,
                 f"rebuilding it with hidden states {store_layers}")
    else:
        _explain_others(folder.parent, prefix, ident, folder)
    folder.mkdir(parents=True, exist_ok=True)
    return store_layers


__all__ = ["prepare_folder"]
