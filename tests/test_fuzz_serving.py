"""Property-based tests of the serving commands' inputs: ``--users``, ``--sequence`` and
``--new_items`` of ``run_recbole_iisan.py --recommend=CKPT``, through the command line (argv in,
exit code and printed lines out) on the tiny IISANVS of ``tests/test_recommend.py``.

Every generated input ends in exit 0 with the recommendations it asks for (one block per user or
sequence, ``topk`` items each, none of them in the history) or in ONE ``error:`` line with exit
code 2; ``--new_items`` leaves no temporary file in the cache folder. The checkpoint is loaded
once (``load_run`` is what the command calls; the inputs are what is fuzzed here).
"""
from __future__ import annotations

import re

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from fuzzing import fuzz, one_error_line, partial_files
from test_recommend import _histories, trained  # noqa: F401  (the module's trained model)

from recbole_iisan.quick_start import cli

TOPK = 3


@pytest.fixture(scope="module")
def served(trained):  # noqa: F811
    from recbole_iisan.serving import recommend as rec

    run = rec.load_run(trained["ckpt"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rec, "load_run", lambda *a, **k: run)
        yield Served({**trained, "run": run, "hist": _histories(trained["root"] / "data")})


class Served(dict):
    """The trained run (short repr: hypothesis prints its arguments with a failing example)."""

    def __repr__(self) -> str:
        return f"<trained {self['ckpt']}>"


def call(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def blocks(out: str) -> dict[str, list[str]]:
    """``user X:`` blocks of the printout -> their item ids, in order."""
    found: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.fullmatch(r"user (.*):", line)
        if m:
            current = m.group(1)
            assert current not in found, f"two blocks for {current!r}"
            found[current] = []
        elif line.strip() and current is not None and not line.strip().startswith("rank"):
            found[current].append(line.split()[1])
    return found


USER = st.one_of(st.sampled_from([f"u{i}" for i in range(60)]), st.sampled_from([" ", "", "u3 ", "U3", "u3\x00", "u9999", "i1"]),
                 st.text(max_size=4))
ITEM = st.one_of(st.sampled_from([f"i{i}" for i in range(40)]), st.sampled_from(["", "i999", "u3", "I1", "[PAD]"]),
                 st.text(max_size=3))


@fuzz(40)
@given(users=st.lists(USER, max_size=5))
# found by this test: a user given twice printed one block of 2 x topk rows
@example(users=["u3", "u3"])
@example(users=["[PAD]"])
def test_users_give_their_recommendations_or_one_line(served, capsys, users):
    arg = ",".join(users)
    code, out, err = call(capsys, [f"--recommend={served['ckpt']}", f"--users={arg}", f"--topk={TOPK}"])
    names = list(dict.fromkeys(u.strip() for u in arg.split(",") if u.strip()))
    if code != 0:
        assert code == 2
        line = one_error_line(err)
        event("refused")
        assert not names or any(n not in served["hist"] for n in names), line
        return
    event("answered")
    assert err == "" and names and all(n in served["hist"] for n in names)
    got = blocks(out)
    assert list(got) == names
    for n, ids in got.items():
        assert len(ids) == TOPK and not set(ids) & set(served["hist"][n])


@fuzz(40)
@given(seqs=st.lists(st.lists(ITEM, max_size=5).map(" ".join), min_size=1, max_size=3))
@example(seqs=["i1 [PAD]"])
@example(seqs=["  "])
def test_sequences_give_their_recommendations_or_one_line(served, capsys, seqs):
    argv = [f"--recommend={served['ckpt']}", f"--topk={TOPK}"] + [f"--sequence={s}" for s in seqs]
    code, out, err = call(capsys, argv)
    known = set(served["run"].item_tokens()[1:])
    split = [s.split() for s in seqs]
    if code != 0:
        assert code == 2
        line = one_error_line(err)
        event("refused")
        assert any(not s or not set(s) <= known for s in split), line
        return
    event("answered")
    assert err == "" and all(s and set(s) <= known for s in split)
    got = blocks(out)
    assert list(got) == [f"seq{k + 1}" for k in range(len(seqs))]
    for s, ids in zip(split, got.values()):
        assert len(ids) == TOPK and not set(ids) & set(s)


NEW_ID = st.one_of(st.sampled_from(["n1", "n2", "n3", "i1", "item_id", ""]), st.text(max_size=4))
NEW_ROW = st.tuples(NEW_ID, st.sampled_from(["red glass flask", "", "box", "lab scale 10 ml"]),
                    st.sampled_from([None, None, "", "x.png"]))


@fuzz(20, timeout=60)
@given(rows=st.lists(NEW_ROW, max_size=4), header=st.booleans(), junk=st.one_of(st.none(), st.binary(max_size=6)))
# found by this test: a non-UTF-8 byte in the file ended in a UnicodeDecodeError traceback
@example(rows=[("n1", "box", None)], header=False, junk=b"\xff")
def test_new_items_files_give_recommendations_or_one_line(served, capsys, tmp_path_factory, rows, header, junk):
    folder = tmp_path_factory.mktemp("new")
    lines = (["item_id\ttitle"] if header else []) + ["\t".join(c for c in r if c is not None) for r in rows]
    data = ("\n".join(lines) + "\n").encode("utf-8") + (junk or b"")
    path = folder / "new.tsv"
    path.write_bytes(data)
    code, out, err = call(capsys, [f"--recommend={served['ckpt']}", "--users=u3", "--topk=60",
                                   f"--new_items={path}"])
    assert partial_files(served["root"] / "cache") == []
    if code != 0:
        assert code == 2
        event("refused: " + one_error_line(err)[:40])
        return
    event("answered")
    ids = [r[0].strip() for r in rows if r[0].strip()]
    got = blocks(out)["u3"]
    assert set(ids) <= set(got)  # every new item is ranked with the known ones
