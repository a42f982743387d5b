"""Property-based tests of the raw-file reader (``data/atomic_files.py``) and ``python -m
recbole_iisan.prepare`` on generated users / items TSVs.

- round trip: generated users and items, written with random formatting (BOM, CRLF, blank and
  whitespace-only lines, spaces around the item list, no final newline), read back as generated;
- garbage: arbitrary bytes and lines (tabs, quotes, empty lines, non-UTF-8, NUL, huge ids,
  missing or extra columns) give a result or ONE ``PrepareError`` line ``<file>[:<line>]: ...``;
- the command: generated files, options and one damaged line through ``prepare.main`` end in the
  atomic files RecBole reads back (with RecBole's own pandas call) as the users and items the
  options keep, or in one ``error:`` line, exit code 2 and no file (final or temporary) written.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pandas._libs.parsers import STR_NA_VALUES
from hypothesis import event, example, given
from hypothesis import strategies as st

from fuzzing import fuzz, one_error_line, one_line, partial_files
from recbole_iisan.data import atomic_files as af
from recbole_iisan.utils.errors import PrepareError

USERS = "am_Fuzz_users.tsv"
ITEMS = "Fuzz_items.tsv"

# --------------------------------------------------------------------------------------------
# strategies

#: what pandas (RecBole's reader) reads as a missing value (its own list, not the plugin's copy)
PANDAS_NA = frozenset(STR_NA_VALUES)
#: ids a well-formed file holds (RecBole reads them back as they are)
SAFE_ID = st.from_regex(r"[A-Za-z0-9_.\-]{1,8}", fullmatch=True).filter(lambda s: s not in PANDAS_NA)
#: ids that look fine in a TSV but that RecBole would not read back as written
TRICKY_ID = st.sampled_from(["NA", "null", "nan", "None", "N/A", "#N/A", '"q"', "x" * 600, "é" * 300])
#: mostly safe, sometimes tricky
ID = st.one_of(SAFE_ID, SAFE_ID, SAFE_ID, SAFE_ID, TRICKY_ID)
#: anything a user may put in an id column
WILD_ID = st.one_of(
    SAFE_ID, st.text(max_size=8),
    st.sampled_from(["NA", "null", "nan", "None", "N/A", '"q"', "'q'", "9" * 5000, "\ufeffI1", "a b",
                     "#", "-1", "I\x00", "I\u2028", "\\t", "é", "🙂"]))
#: titles: quotes, HTML entities, controls, unicode line breaks, empty, huge
TITLE = st.one_of(
    st.text(alphabet=st.characters(exclude_characters="\t\n", codec="utf-8"), max_size=30),
    st.sampled_from(['say "hi"', "&amp; &lt;b&gt; &#0; &#x110000;", "a\rb", "", "   ", "NA", "\u2028x\x0b"]),
    st.just("t" * 140_000))  # beyond the 131,072 characters RecBole's reader takes in a field
NEWLINE = st.sampled_from(["\n", "\r\n"])


@st.composite
def dataset(draw, ids: st.SearchStrategy | None = None, max_items: int = 12, max_users: int = 10) -> tuple[dict, list]:
    """``({item: title}, [(user, [items])])``: unique ids (in one dataset of four, some tricky),
    sequences over the items (and, rarely, ids the items file lacks)."""
    if ids is None:
        ids = ID if draw(st.integers(0, 3)) == 0 else SAFE_ID
    items = draw(st.dictionaries(ids, TITLE, min_size=1, max_size=max_items))
    pool = list(items) + draw(st.lists(SAFE_ID.filter(lambda s: s not in items), max_size=2))
    users = draw(st.dictionaries(ids, st.lists(st.sampled_from(pool), min_size=1, max_size=9),
                                 min_size=1, max_size=max_users))
    return items, list(users.items())


#: how a file is laid out: BOM or not, LF or CRLF, a blank / whitespace-only line before every
#: ``every``-th row (0: none), with or without the final newline
FORMAT = st.fixed_dictionaries({"bom": st.booleans(), "nl": NEWLINE, "final": st.booleans(),
                                "blank": st.sampled_from(["", " ", "\t ", "  \t"]), "every": st.integers(0, 3)})
PLAIN = {"bom": False, "nl": "\n", "final": True, "blank": "", "every": 0}


def layout(rows: list[str], fmt: dict) -> bytes:
    """``rows`` as a file laid out as ``fmt`` (:data:`FORMAT`) says."""
    out = []
    for k, row in enumerate(rows):
        if fmt["every"] and k % fmt["every"] == 0:
            out.append(fmt["blank"])
        out.append(row)
    text = fmt["nl"].join(out) + (fmt["nl"] if fmt["final"] else "")
    # damaged rows carry their raw bytes as surrogate escapes
    return (b"\xef\xbb\xbf" if fmt["bom"] else b"") + text.encode("utf-8", "surrogateescape")


def item_rows(items: dict) -> list[str]:
    return [f"{i}\t{t}" for i, t in items.items()]


def user_rows(users: list, pad: str = "") -> list[str]:
    return [f"{u}\t{pad}{' '.join(seq)}{pad}" for u, seq in users]


def junk_line() -> st.SearchStrategy[bytes]:
    """One damaged line: wild ids and columns, raw bytes (non-UTF-8 too)."""
    text = st.builds(lambda cols: "\t".join(cols), st.lists(st.one_of(WILD_ID, TITLE), max_size=4))
    return st.one_of(text.map(lambda s: s.encode("utf-8")),
                     st.binary(max_size=20).filter(lambda b: b"\n" not in b))


def error_site(path: Path, message: str, n_lines: int) -> None:
    """A PrepareError names the file, and a line that exists."""
    one_line(message)
    assert message.startswith(f"{path}:") or message.startswith(f"{path} "), message
    rest = message[len(str(path)) + 1:]
    head = rest.split(":", 1)[0]
    if head.isdigit():
        assert 1 <= int(head) <= max(n_lines, 1), message


# --------------------------------------------------------------------------------------------
# the readers

@fuzz(60)
@given(ds=dataset(ids=SAFE_ID), items_fmt=FORMAT, users_fmt=FORMAT, pad=st.sampled_from(["", " ", "  "]))
def test_well_formed_files_read_back_as_generated(tmp_path_factory, ds, items_fmt, users_fmt, pad):
    items, users = ds
    folder = tmp_path_factory.mktemp("rt")
    (folder / ITEMS).write_bytes(layout(item_rows(items), items_fmt))
    (folder / USERS).write_bytes(layout(user_rows(users, pad), users_fmt))
    got_items = af.read_items(folder / ITEMS)
    assert list(got_items) == list(items)
    assert [af.clean_title(t) for t in got_items.values()] == [af.clean_title(t) for t in items.values()]
    assert [(u, s) for u, s, _ in af.read_users(folder / USERS)] == users


@fuzz(100)
@given(lines=st.lists(junk_line(), max_size=6), which=st.sampled_from(["items", "users"]),
       bom=st.sampled_from([b"", b"\xef\xbb\xbf"]), nl=st.sampled_from([b"\n", b"\r\n"]))
# found by this test: ids RecBole reads as missing, or longer than an LMDB key, were accepted
@example(lines=[b"t" * 600 + b"\tx"], which="items", bom=b"", nl=b"\n")
@example(lines=[b"I1\tx", b"NA\ty"], which="items", bom=b"", nl=b"\n")
@example(lines=[b"null\tI1 I2"], which="users", bom=b"", nl=b"\n")
def test_any_bytes_give_a_result_or_one_line_naming_file_and_line(tmp_path_factory, lines, which, bom, nl):
    path = tmp_path_factory.mktemp("junk") / (ITEMS if which == "items" else USERS)
    raw = bom + nl.join(lines)
    path.write_bytes(raw)
    reader = af.read_items if which == "items" else af.read_users
    try:
        out = reader(path)
    except PrepareError as exc:
        error_site(path, str(exc), raw.count(b"\n") + 1)
        event(f"{which}: error")
        return
    event(f"{which}: read")
    assert out  # a result is never empty: an empty file is an error
    ids = list(out) if which == "items" else [u for u, _, _ in out]
    assert len(ids) == len(set(ids)) and all(i and i == i.strip() for i in ids)
    assert all(map(readable, ids))


# --------------------------------------------------------------------------------------------
# the command

def recbole_reads(path: Path) -> pd.DataFrame:
    """An atomic file read the way RecBole 1.2.1 reads it (``Dataset._load_feat``)."""
    head = path.read_text(encoding="utf-8").split("\n", 1)[0]
    dtype = {h: (float if h.endswith(":float") else str) for h in head.split("\t")}
    return pd.read_csv(path, delimiter="\t", dtype=dtype, encoding="utf-8", engine="python")


def readable(token: str) -> bool:
    """Whether RecBole reads ``token`` back as written and the cache can key it (LMDB: 511 bytes)."""
    return not token.startswith('"') and token not in PANDAS_NA and len(token.encode()) <= 511


def expected(items: dict, users: list, opts: dict) -> tuple[list, list] | None:
    """``(inter rows, item rows)`` prepare must write, or None when it must refuse."""
    if not all(map(readable, list(items) + [u for u, _ in users])):
        return None
    kept = []
    for u, seq in users:
        unknown = [i for i in seq if i not in items]
        if unknown and opts["unknown_items"] == "error":
            return None
        seq = [i for i in seq if i in items]
        if len(seq) < opts["min_seq_len"]:
            continue
        kept.append((u, seq[-(opts["max_seq_len"] + 3):] if opts["paper_protocol"] else seq))
    if not kept or opts["max_seq_len"] < 1:
        return None
    used = {i for _, s in kept for i in s}
    inter = [(u, i, float(p)) for u, s in kept for p, i in enumerate(s)]
    return inter, [(i, af.clean_title(t)) for i, t in items.items() if i in used]


OPTIONS = st.fixed_dictionaries({
    "min_seq_len": st.integers(-1, 4), "max_seq_len": st.one_of(st.integers(1, 4), st.integers(-1, 4)),
    "paper_protocol": st.booleans(), "unknown_items": st.sampled_from(["error", "drop"])})


def prepare_argv(raw: Path, data: Path, name: str, opts: dict) -> list[str]:
    argv = [f"--dataset={name}", f"--raw_dir={raw}", f"--data_path={data}", "--quiet",
            f"--min_seq_len={opts['min_seq_len']}", f"--max_seq_len={opts['max_seq_len']}",
            f"--unknown_items={opts['unknown_items']}"]
    return argv + (["--paper_protocol"] if opts["paper_protocol"] else [])


DAMAGE = st.one_of(st.none(), st.none(), st.tuples(st.sampled_from(["items", "users"]), st.integers(0, 20), junk_line()))
NAME = st.one_of(st.just("Fuzz"), st.just("Fuzz"), st.just("Fuzz"), st.text(max_size=6))
DEFAULTS = {"min_seq_len": 1, "max_seq_len": 4, "paper_protocol": False, "unknown_items": "error"}


@fuzz(50)
@given(ds=dataset(), opts=OPTIONS, damage=DAMAGE, items_fmt=FORMAT, users_fmt=FORMAT, name=NAME)
# found by this test: an id RecBole reads as NaN was written; a title longer than RecBole's reader
# takes in one field made the written .item file unreadable
@example(ds=({"NA": "t", "I2": "u"}, [("U1", ["NA", "I2"])]), opts=DEFAULTS, damage=None,
         items_fmt=PLAIN, users_fmt=PLAIN, name="Fuzz")
@example(ds=({"I1": "t" * 140_000}, [("U1", ["I1", "I1"])]), opts=DEFAULTS, damage=None,
         items_fmt=PLAIN, users_fmt=PLAIN, name="Fuzz")
@example(ds=({"I1": "t"}, [("U1", ["I1"])]), opts=DEFAULTS, damage=None, items_fmt=PLAIN, users_fmt=PLAIN, name="..")
def test_prepare_writes_what_recbole_reads_back_or_one_error_line(tmp_path_factory, capsys, ds, opts, damage,
                                                                   items_fmt, users_fmt, name):
    from recbole_iisan.prepare import main as prepare_main

    items, users = ds
    root = tmp_path_factory.mktemp("prep")
    rows = {"items": item_rows(items), "users": user_rows(users)}
    if damage is not None:  # one line replaced by a damaged one
        which, at, junk = damage
        rows[which][at % len(rows[which])] = junk.decode("utf-8", "surrogateescape")
    raw = root / "raw"
    raw.mkdir()
    (raw / ITEMS).write_bytes(layout(rows["items"], items_fmt))
    (raw / USERS).write_bytes(layout(rows["users"], users_fmt))
    capsys.readouterr()
    code = prepare_main(prepare_argv(raw, root / "data", name, opts))
    err = capsys.readouterr().err
    event(f"exit {code}")
    if code != 0:
        assert code == 2
        event("error: " + one_error_line(err).split(": ")[-1][:30])
        assert partial_files(root / "data") == []
        assert not list((root / "data").rglob("*.inter")) if (root / "data").exists() else True
        if damage is None and af.dataset_name_problem(name) is None:
            assert expected(items, users, opts) is None, err  # a clean input is refused only for a reason
        return
    assert err == ""
    want = expected(af.read_items(raw / ITEMS), [(u, s) for u, s, _ in af.read_users(raw / USERS)], opts)
    assert want is not None
    out = root / "data" / name
    inter = recbole_reads(out / f"{name}.inter")
    assert list(inter.itertuples(index=False, name=None)) == want[0]
    assert list(recbole_reads(out / f"{name}.item")["item_id:token"]) == [i for i, _ in want[1]]
    titles = [ln.split("\t")[1] for ln in (out / f"{name}.item").read_text(encoding="utf-8").splitlines()[1:]]
    assert titles == [t for _, t in want[1]]
    assert partial_files(root / "data") == []


@pytest.mark.parametrize("name", [".", "..", "a/b", "", "x\x00y"])
def test_dataset_names_that_are_no_folder_name_are_refused(tmp_path, capsys, name):
    from recbole_iisan.prepare import main as prepare_main

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / ITEMS).write_text("I1\tt\n")
    (raw / USERS).write_text("U1\tI1 I1 I1 I1 I1\n")
    assert prepare_main([f"--dataset={name}", f"--raw_dir={raw}", f"--data_path={tmp_path / 'd'}"]) == 2
    assert "dataset name" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").rglob("*.inter"))
