"""Raw IISAN-format datasets -> RecBole atomic files.

The authors' Amazon datasets (Scientific, Instrument, Office; github.com/GAIR-Lab/IISAN ``Dataset/``)
come as two header-less TAB-separated files:

- users file ``am_*_users*.tsv``: ``user_id TAB item item item ...`` (space-separated item ids,
  oldest first; repeats, even consecutive ones, are real interactions);
- items file ``*_items.tsv``: ``item_id TAB title``.

:func:`prepare_dataset` turns them into ``<data_path>/<dataset>/<dataset>.inter``
(``user_id:token  item_id:token  timestamp:float``; the timestamp is the position in the user's
sequence, so RecBole's ``order: TO`` reproduces the sequence) and ``<dataset>.item``
(``item_id:token  title:token_seq``), plus ``<dataset>.prepare.json`` (sources, options, counts),
which lets a second run with the same inputs return at once ("up to date").

Policies (all explicit and logged):

- users with fewer than ``min_seq_len`` items are skipped;
- ``paper_protocol``: each sequence is cut to its most recent ``max_seq_len + 3`` items *before*
  the item set is chosen (IISAN's truncation; gives the paper's Table I counts);
- items written = items that occur in the kept interactions, in items-file order;
- an item id in the users file that the items file lacks is an error (``file:line``), or with
  ``unknown_items="drop"`` those interactions are dropped and counted;
- titles: HTML entities decoded, TAB/CR/LF -> space, whitespace collapsed, ``"`` -> ``''`` (RecBole's
  reader would take a field starting with ``"`` as quoted); an empty title is kept as empty and
  counted in a warning; a title longer than RecBole's reader takes in a field is cut to that length;
- ids: an id RecBole or the cache could not take as written (a leading ``"``, a value pandas reads
  as missing such as ``NA`` or ``null``, more than LMDB's 511-byte key) is an error (``file:line``);
- a malformed line raises :class:`PrepareError` with ``<file>:<line>: <what was expected>``;
  blank lines are skipped.
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger("recbole_iisan.prepare")


USERS_GLOB = "am_*_users*.tsv"
ITEMS_GLOB = "*_items.tsv"
INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
ITEM_HEADER = "item_id:token\ttitle:token_seq"
MANIFEST_VERSION = 1
UNKNOWN_ITEM_POLICIES = ("error", "drop")

_WS = re.compile(r"\s+")
#: what RecBole's reader (pandas ``read_csv``'s default ``na_values``) reads as a missing value;
#: an id written as one of these would come back as NaN (tests compare with pandas' own list)
NA_TOKENS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
#: LMDB's largest key: an item token is the key of its cached states and of its image
MAX_TOKEN_BYTES = 511
#: the longest field RecBole's reader takes (pandas' python engine: ``csv.field_size_limit()``)
MAX_FIELD_CHARS = 131_072


from recbole_iisan.utils.errors import PrepareError  # noqa: E402,F401  (re-exported)
from recbole_iisan.utils.files import PathLike, atomic_write_text, bundled_dataset_dir  # noqa: E402


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def find_raw_files(raw_dir: PathLike) -> Tuple[Path, Path]:
    """The users file (``am_*_users*.tsv``) and the items file (``*_items.tsv``) in ``raw_dir``.

    Exactly one of each must exist, otherwise :class:`PrepareError` lists what was found."""
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise PrepareError(f"{raw}: raw data folder not found (expected a folder holding "
                           f"{USERS_GLOB} and {ITEMS_GLOB})")
    users = sorted(p for p in raw.glob(USERS_GLOB) if p.is_file())
    items = sorted(p for p in raw.glob(ITEMS_GLOB) if p.is_file() and p not in users)
    problems = []
    if len(users) != 1:
        problems.append(f"{len(users)} users files matching {USERS_GLOB} "
                        f"({', '.join(p.name for p in users) or 'none'})")
    if len(items) != 1:
        problems.append(f"{len(items)} items files matching {ITEMS_GLOB} "
                        f"({', '.join(p.name for p in items) or 'none'})")
    if problems:
        raise PrepareError(f"{raw}: expected exactly one users file and one items file, found "
                           + " and ".join(problems))
    return users[0], items[0]


def _read_lines(path: Path) -> List[str]:
    """All lines of a UTF-8 text file (a BOM is tolerated), without their line ends."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PrepareError(f"{path}: file not found") from None
    except OSError as exc:
        raise PrepareError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PrepareError(f"{path}:{line}: expected UTF-8 text, found byte "
                           f"0x{data[exc.start]:02x}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def clean_title(title: str) -> str:
    """A title RecBole's reader takes verbatim: HTML entities decoded, TAB/CR/LF and runs of
    whitespace -> one space, ``"`` -> ``''`` (so no field starts with a quote), stripped, cut to
    the :data:`MAX_FIELD_CHARS` characters RecBole's reader takes in one field."""
    title = html.unescape(title)
    title = _WS.sub(" ", title).strip()
    return title.replace('"', "''")[:MAX_FIELD_CHARS]


def token_problem(token: str) -> Optional[str]:
    """Why RecBole or the cache could not take ``token`` as an id as written (None: it can):
    RecBole's reader (pandas) reads a leading ``"`` as a quote and :data:`NA_TOKENS` as missing,
    and LMDB keys (the caches, the image store) hold at most :data:`MAX_TOKEN_BYTES` bytes."""
    if token.startswith('"'):
        return "does not start with '\"'"
    if token in NA_TOKENS:
        return "RecBole does not read as missing (NA, null, nan, ...)"
    if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
        return f"of at most {MAX_TOKEN_BYTES} bytes"
    return None


def _check_token(token: str, path: Path, lineno: int, what: str) -> None:
    problem = token_problem(token)
    if problem is not None:
        shown = token if len(token) <= 40 else token[:40] + f"... ({len(token):,} characters)"
        article = "an" if what[0] in "aeiou" else "a"
        raise PrepareError(f"{path}:{lineno}: expected {article} {what} that {problem}, found {shown!r}")


def _keyed_lines(path: Path, what: str, second: str) -> Iterator[Tuple[int, str, str]]:
    """``(line number, id, second column)`` of a two-column TAB file whose first column holds
    unique ids (``what``: "item" or "user"); blank lines skipped, each bad line one error."""
    first_line: Dict[str, int] = {}
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise PrepareError(f"{path}:{lineno}: expected 2 TAB-separated columns "
                               f"({what} id, {second}), found {len(cols)}")
        key = cols[0].strip()
        if not key or _WS.search(key):
            raise PrepareError(f"{path}:{lineno}: expected a non-empty {what} id without spaces "
                               f"in column 1, found {cols[0]!r}")
        _check_token(key, path, lineno, f"{what} id")
        if key in first_line:
            raise PrepareError(f"{path}:{lineno}: expected unique {what} ids, {key!r} is already "
                               f"on line {first_line[key]}")
        first_line[key] = lineno
        yield lineno, key, cols[1]


def read_items(path: PathLike) -> Dict[str, str]:
    """``item_id -> raw title`` in items-file order (titles not cleaned yet)."""
    path = Path(path)
    items = {item: title for _, item, title in _keyed_lines(path, "item", "title")}
    if not items:
        raise PrepareError(f"{path}: expected item lines (item id TAB title), the file is empty")
    return items


def read_users(path: PathLike) -> List[Tuple[str, List[str], int]]:
    """``[(user_id, [item, ...] oldest first, line number), ...]`` in file order."""
    path = Path(path)
    users: List[Tuple[str, List[str], int]] = []
    for lineno, user, items in _keyed_lines(path, "user", "space-separated item ids"):
        seq = items.split()
        if not seq:
            raise PrepareError(f"{path}:{lineno}: expected at least one item id in column 2 "
                               f"of user {user!r}, found none")
        users.append((user, seq, lineno))
    if not users:
        raise PrepareError(f"{path}: expected user lines (user id TAB item ids), "
                           f"the file is empty")
    return users


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _manifest_path(data_path: PathLike, dataset: str) -> Path:
    return Path(data_path) / dataset / f"{dataset}.prepare.json"


def _load_manifest(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _outputs_match(manifest: dict, out_dir: Path) -> bool:
    for name, size in manifest.get("outputs", {}).items():
        p = out_dir / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return bool(manifest.get("outputs"))


def read_item_tokens(item_file: PathLike) -> List[str]:
    """The item ids (first column) of an atomic ``.item`` file, in file order."""
    lines = _read_lines(Path(item_file))
    return [ln.split("\t", 1)[0] for ln in lines[1:] if ln]


# --------------------------------------------------------------------------------------------
# the library entry point
# --------------------------------------------------------------------------------------------
def prepare_dataset(dataset: str, raw_dir: PathLike, data_path: PathLike,
                    images: Optional[PathLike] = None, paper_protocol: bool = False,
                    min_seq_len: int = 5, max_seq_len: int = 10,
                    unknown_items: str = "error", force: bool = False) -> dict:
    """Raw users/items TSVs in ``raw_dir`` -> ``<data_path>/<dataset>/<dataset>.inter|.item``.

    ``images`` (a folder or ``.zip`` of ``<item_id>.jpg|png``) is imported into the dataset's
    LMDB image store (:func:`recbole_iisan.data.images.import_images`) for the prepared items.
    Returns the counts (``users``, ``items``, ``interactions``, ``skipped_users``,
    ``truncated_users``, ``dropped_interactions``, ``empty_titles``, ``raw_users``,
    ``raw_interactions``, ``raw_items``, ``items_in_file``), the ``options``, the output paths,
    ``up_to_date`` and, with ``images``, an ``images`` entry with the coverage."""
    options = _check_options(dataset, paper_protocol, min_seq_len, max_seq_len, unknown_items)
    users_file, items_file = find_raw_files(raw_dir)
    out_dir = Path(data_path) / dataset
    paths = {"inter_file": out_dir / f"{dataset}.inter", "item_file": out_dir / f"{dataset}.item",
             "manifest": _manifest_path(data_path, dataset)}
    sources = {"users": _file_stamp(users_file), "items": _file_stamp(items_file)}
    old = None if force else _load_manifest(paths["manifest"])
    if (old is not None and old.get("version") == MANIFEST_VERSION and old.get("sources") == sources
            and old.get("options") == options and _outputs_match(old, out_dir)):
        counts, tokens, up_to_date = dict(old["counts"]), None, True
        logger.info(f"prepare {dataset}: up to date ({paths['inter_file']}, {paths['item_file']}); "
                    f"{counts['users']:,} users, {counts['items']:,} items, {counts['interactions']:,} interactions")
    else:
        t0 = time.perf_counter()
        counts, tokens = _convert(dataset, users_file, items_file, paths, options)
        _write_manifest(dataset, paths, sources, options, counts)
        up_to_date = False
        opts = ", ".join(f"{k}={v}" for k, v in options.items())
        logger.info(
            f"prepare {dataset}: {counts['users']:,} users, {counts['items']:,} items, "
            f"{counts['interactions']:,} interactions ({opts}; raw: {counts['raw_interactions']:,} "
            f"interactions, {counts['raw_items']:,} distinct items, {counts['items_in_file']:,} in items file; "
            f"{counts['truncated_users']:,} users truncated) -> {out_dir} in {time.perf_counter() - t0:.1f} s")
    result = dict(counts, dataset=dataset, options=options, up_to_date=up_to_date,
                  **{k: str(v) for k, v in paths.items()})
    if images is not None:
        result["images"] = _import_images(images, data_path, dataset,
                                          tokens if tokens is not None else read_item_tokens(paths["item_file"]))
    return result


def dataset_name_problem(dataset: str) -> Optional[str]:
    """Why ``dataset`` cannot name the folder and files of a dataset (None: it can)."""
    if not dataset or dataset in (".", "..") or "\0" in dataset:
        return "that names a folder (not empty, '.', '..' or holding NUL)"
    if os.sep in dataset or (os.altsep and os.altsep in dataset):
        return "without path separators"
    return None


def _check_options(dataset: str, paper_protocol: bool, min_seq_len: int, max_seq_len: int,
                   unknown_items: str) -> dict:
    problem = dataset_name_problem(dataset)
    if problem is not None:
        raise PrepareError(f"expected a dataset name {problem}, found {dataset!r}")
    if unknown_items not in UNKNOWN_ITEM_POLICIES:
        raise PrepareError(f"unknown_items: expected one of {UNKNOWN_ITEM_POLICIES}, found {unknown_items!r}")
    if int(max_seq_len) < 1:
        raise PrepareError(f"max_seq_len: expected a positive integer, found {int(max_seq_len)}")
    return {"paper_protocol": bool(paper_protocol), "min_seq_len": int(min_seq_len),
            "max_seq_len": int(max_seq_len), "unknown_items": unknown_items}


def _drop_unknown_items(dataset: str, users: list, raw_items: dict, users_file: Path, items_file: Path,
                        policy: str) -> int:
    """Item ids missing from the items file: one line naming the first (``error``), or drop them."""
    dropped = 0
    for idx, (user, seq, lineno) in enumerate(users):
        unknown = [i for i in seq if i not in raw_items]
        if not unknown:
            continue
        if policy == "error":
            raise PrepareError(f"{users_file}:{lineno}: expected item ids listed in {items_file.name}, item "
                               f"{unknown[0]!r} of user {user!r} is not (use unknown_items=drop to drop such interactions)")
        dropped += len(unknown)
        users[idx] = (user, [i for i in seq if i in raw_items], lineno)
    if dropped:
        logger.warning(f"prepare {dataset}: dropped {dropped:,} interactions with item ids "
                       f"missing from {items_file.name} (unknown_items=drop)")
    return dropped


def _keep_users(dataset: str, users: list, options: dict, users_file: Path) -> tuple[list, int, int]:
    """Users with at least ``min_seq_len`` items, cut to their last ``max_seq_len + 3`` under the
    paper protocol: ``(kept, skipped, truncated)``."""
    keep_last = options["max_seq_len"] + 3
    skipped = truncated = 0
    kept: List[Tuple[str, List[str]]] = []
    for user, seq, _ in users:
        if len(seq) < options["min_seq_len"]:
            skipped += 1
            continue
        if options["paper_protocol"] and len(seq) > keep_last:
            seq = seq[-keep_last:]
            truncated += 1
        kept.append((user, seq))
    if skipped:
        logger.info(f"prepare {dataset}: skipped {skipped:,} users with fewer than {options['min_seq_len']} items")
    if not kept:
        raise PrepareError(f"{users_file}: expected at least one user with {options['min_seq_len']} or "
                           f"more items, found none")
    return kept, skipped, truncated


def _convert(dataset: str, users_file: Path, items_file: Path, paths: dict, options: dict) -> tuple[dict, list[str]]:
    """Read, check and filter the raw files, write the atomic files; the counts and the item tokens."""
    raw_items = read_items(items_file)
    users = read_users(users_file)
    raw_interactions = sum(len(seq) for _, seq, _ in users)
    raw_distinct = len({i for _, seq, _ in users for i in seq})
    dropped = _drop_unknown_items(dataset, users, raw_items, users_file, items_file, options["unknown_items"])
    kept, skipped, truncated = _keep_users(dataset, users, options, users_file)
    used = {i for _, seq in kept for i in seq}
    item_lines = [ITEM_HEADER]
    empty_titles = 0
    for item, title in raw_items.items():
        if item in used:
            title = clean_title(title)
            empty_titles += not title
            item_lines.append(f"{item}\t{title}")
    if empty_titles:
        logger.warning(f"prepare {dataset}: {empty_titles:,} items have an empty title after "
                       f"cleaning; they are kept with an empty title")
    inter_lines = [INTER_HEADER]
    for user, seq in kept:
        inter_lines.extend(f"{user}\t{item}\t{pos}" for pos, item in enumerate(seq))
    paths["inter_file"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths["inter_file"], "\n".join(inter_lines) + "\n")
    atomic_write_text(paths["item_file"], "\n".join(item_lines) + "\n")
    counts = {"users": len(kept), "items": len(used), "interactions": len(inter_lines) - 1,
              "skipped_users": skipped, "truncated_users": truncated, "dropped_interactions": dropped,
              "empty_titles": empty_titles, "raw_users": len(users), "raw_interactions": raw_interactions,
              "raw_items": raw_distinct, "items_in_file": len(raw_items)}
    return counts, [ln.split("\t", 1)[0] for ln in item_lines[1:]]


def _write_manifest(dataset: str, paths: dict, sources: dict, options: dict, counts: dict) -> None:
    """What was prepared from what: a later run with the same sources and options is up to date."""
    manifest = {
        "version": MANIFEST_VERSION, "dataset": dataset, "sources": sources, "options": options, "counts": counts,
        "outputs": {paths["inter_file"].name: paths["inter_file"].stat().st_size,
                    paths["item_file"].name: paths["item_file"].stat().st_size},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(paths["manifest"], json.dumps(manifest, indent=2) + "\n")


def _import_images(images: PathLike, data_path: PathLike, dataset: str,
                   item_tokens: Sequence[str]) -> dict:
    from recbole_iisan.data.images import default_image_store_path, import_images

    report = import_images(images, default_image_store_path(data_path, dataset),
                           item_tokens=item_tokens)
    return report.as_dict()


def import_dataset_images(dataset: str, data_path: PathLike, images: PathLike) -> dict:
    """Import ``images`` for a dataset that is already in atomic form (no raw files needed).

    The item tokens come from ``<data_path>/<dataset>/<dataset>.item`` or, for ``ml-100k``
    when that file is absent, from RecBole's bundled copy."""
    bundled = bundled_dataset_dir(dataset, data_path)
    item_file = (bundled or Path(data_path) / dataset) / f"{dataset}.item"
    if not item_file.is_file():
        raise PrepareError(f"{item_file}: file not found (prepare the dataset first, or give "
                           f"--raw_dir)")
    tokens = read_item_tokens(item_file)
    return _import_images(images, data_path, dataset, tokens)
