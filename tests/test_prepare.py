"""Raw IISAN-format TSVs -> RecBole atomic files (recbole_iisan.data.atomic_files, CLI)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from recbole_iisan.data.atomic_files import PrepareError, clean_title, prepare_dataset
from recbole_iisan.prepare import main as cli_main

from conftest import SHARED  # noqa: E402  (../shared beside the repository; tests skip when absent)
SCIENTIFIC = SHARED / "datasets/Scientific"
REPO = Path(__file__).resolve().parents[1]


def write_raw(folder: Path, users: str, items: str, name: str = "Toy") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"am_{name}_users.tsv").write_text(users, encoding="utf-8")
    (folder / f"{name}_items.tsv").write_text(items, encoding="utf-8")
    return folder


def read_rows(path: Path):
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    return lines[0], [ln.split("\t") for ln in lines[1:-1]]


ITEMS = (
    "i1\tFirst &amp; best\n"
    "i0\tnever used\n"
    "i2\t\" Industrial &amp; Scientific\"\" />\"\n"
    "i3\tA 5\" ruler&#9;with\ttab\n"       # a raw TAB is a 3rd column -> replaced below
    "i4\t  spaced   out&#10;title\r\n"
    "i5\t&nbsp; \n"
    "i6\tsix\n"
)
ITEMS = ITEMS.replace("with\ttab", "with tab")
USERS = (
    "u1\ti1 i1 i2 i3 i4\n"
    "u2\ti4 i3 i2 i1 i5 i6\n"
    "short\ti1 i2\n"
)


@pytest.fixture()
def toy(tmp_path):
    return write_raw(tmp_path / "raw", USERS, ITEMS)


def test_atomic_files(toy, tmp_path, caplog):
    out = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="recbole_iisan.prepare"):
        res = prepare_dataset("Toy", toy, out)
    assert (res["users"], res["items"], res["interactions"]) == (2, 6, 11)
    assert res["skipped_users"] == 1 and res["empty_titles"] == 1 and res["up_to_date"] is False
    assert res["raw_interactions"] == 13 and res["raw_items"] == 6 and res["items_in_file"] == 7

    header, rows = read_rows(out / "Toy" / "Toy.inter")
    assert header == "user_id:token\titem_id:token\ttimestamp:float"
    assert rows[:5] == [["u1", "i1", "0"], ["u1", "i1", "1"], ["u1", "i2", "2"],
                        ["u1", "i3", "3"], ["u1", "i4", "4"]]  # consecutive repeat kept
    assert [r[2] for r in rows[5:]] == ["0", "1", "2", "3", "4", "5"]
    assert [r[1] for r in rows[5:]] == ["i4", "i3", "i2", "i1", "i5", "i6"]
    assert "short" not in {r[0] for r in rows}

    header, rows = read_rows(out / "Toy" / "Toy.item")
    assert header == "item_id:token\ttitle:token_seq"
    titles = dict(rows)
    assert [r[0] for r in rows] == ["i1", "i2", "i3", "i4", "i5", "i6"]  # items-file order, i0 unused
    assert titles["i1"] == "First & best"
    assert titles["i2"] == "'' Industrial & Scientific'''' />''"
    assert titles["i3"] == "A 5'' ruler with tab"
    assert titles["i4"] == "spaced out title"
    assert titles["i5"] == ""
    assert not any(t.startswith('"') or '"' in t for t in titles.values())
    text = caplog.text
    assert "1 items have an empty title" in text
    assert "skipped 1 users with fewer than 5 items" in text
    assert "2 users, 6 items, 11 interactions" in text

    manifest = json.loads((out / "Toy" / "Toy.prepare.json").read_text())
    assert manifest["counts"]["interactions"] == 11
    assert manifest["options"]["paper_protocol"] is False
    assert not [p for p in (out / "Toy").iterdir() if p.name.startswith(".")]  # no temp files left


def test_clean_title():
    assert clean_title("a&amp;b &quot;x&quot;\t\r\n  y ") == "a&b ''x'' y"
    assert clean_title("   ") == ""


def test_up_to_date_and_rebuild(toy, tmp_path, caplog):
    out = tmp_path / "data"
    prepare_dataset("Toy", toy, out)
    with caplog.at_level(logging.INFO, logger="recbole_iisan.prepare"):
        again = prepare_dataset("Toy", toy, out)
    assert again["up_to_date"] is True and again["interactions"] == 11
    assert "up to date" in caplog.text
    # other options -> rebuilt
    res = prepare_dataset("Toy", toy, out, min_seq_len=2)
    assert res["up_to_date"] is False and res["users"] == 3
    # a changed source -> rebuilt
    (toy / "am_Toy_users.tsv").write_text(USERS + "u9\ti6 i6 i6 i6 i6\n", encoding="utf-8")
    res = prepare_dataset("Toy", toy, out, min_seq_len=2)
    assert res["up_to_date"] is False and res["users"] == 4
    # a damaged output -> rebuilt
    (out / "Toy" / "Toy.inter").write_text("x")
    assert prepare_dataset("Toy", toy, out, min_seq_len=2)["up_to_date"] is False


def test_paper_protocol_truncation(tmp_path):
    items = "".join(f"i{k}\tt{k}\n" for k in range(10))
    users = ("a\ti0 i1 i2 i3 i4 i5 i6 i7\n"      # 8 items -> last 5 (max_seq_len=2 -> 2+3)
             "b\ti9 i8 i7 i6 i5\n"               # exactly 5 -> unchanged
             "c\ti3 i2\n")                       # too short (min 5): skipped
    raw = write_raw(tmp_path / "raw", users, items)
    res = prepare_dataset("Toy", raw, tmp_path / "d", paper_protocol=True, max_seq_len=2)
    assert (res["users"], res["interactions"], res["truncated_users"]) == (2, 10, 1)
    _, rows = read_rows(tmp_path / "d" / "Toy" / "Toy.inter")
    assert rows[:5] == [["a", f"i{k}", str(k - 3)] for k in range(3, 8)]
    _, item_rows = read_rows(tmp_path / "d" / "Toy" / "Toy.item")
    # i0..i2 only occurred in the truncated-away part: dropped from the item set
    assert [r[0] for r in item_rows] == [f"i{k}" for k in range(3, 10)]
    full = prepare_dataset("Toy", raw, tmp_path / "e", max_seq_len=2)
    assert (full["users"], full["items"], full["interactions"]) == (2, 10, 13)


def test_unknown_item(tmp_path, caplog):
    raw = write_raw(tmp_path / "raw", "u1\ti1 i2 i3 i1 i2\nu2\ti1 i2 i1 iX i2 i1\n",
                    "i1\ta\ni2\tb\ni3\tc\n")
    with pytest.raises(PrepareError) as exc:
        prepare_dataset("Toy", raw, tmp_path / "d")
    msg = str(exc.value)
    assert f"{raw / 'am_Toy_users.tsv'}:2:" in msg and "'iX'" in msg
    assert not (tmp_path / "d" / "Toy" / "Toy.inter").exists()
    with caplog.at_level(logging.INFO, logger="recbole_iisan.prepare"):
        res = prepare_dataset("Toy", raw, tmp_path / "d", unknown_items="drop")
    assert res["dropped_interactions"] == 1 and res["interactions"] == 10
    assert "dropped 1 interactions" in caplog.text
    with pytest.raises(PrepareError, match="unknown_items"):
        prepare_dataset("Toy", raw, tmp_path / "d", unknown_items="keep")


@pytest.mark.parametrize("users,items,where,what", [
    ("u1\ti1 i1 i1 i1 i1\nu2\ti1\ti1\n", "i1\ta\n", "users", ":2: expected 2 TAB-separated"),
    ("u1\ti1 i1 i1 i1 i1\n\nu2 i1 i1\n", "i1\ta\n", "users", ":3: expected 2 TAB-separated"),
    ("u1\ti1 i1 i1 i1 i1\n\ti1 i1\n", "i1\ta\n", "users", ":2: expected a non-empty user id"),
    ("u1\ti1 i1 i1 i1 i1\nu2\t  \n", "i1\ta\n", "users", ":2: expected at least one item id"),
    ("u1\ti1 i1 i1 i1 i1\nu1\ti1\n", "i1\ta\n", "users", ":2: expected unique user ids"),
    ("u1\ti1 i1 i1 i1 i1\n", "i1\ta\ni2\tb\tc\n", "items", ":2: expected 2 TAB-separated"),
    ("u1\ti1 i1 i1 i1 i1\n", "i1\ta\ni1\tb\n", "items", ":2: expected unique item ids"),
    ("u1\ti1 i1 i1 i1 i1\n", "i1\ta\n\tb\n", "items", ":2: expected a non-empty item id"),
])
def test_malformed_lines(tmp_path, users, items, where, what):
    raw = write_raw(tmp_path / "raw", users, items)
    with pytest.raises(PrepareError) as exc:
        prepare_dataset("Toy", raw, tmp_path / "d")
    name = "am_Toy_users.tsv" if where == "users" else "Toy_items.tsv"
    assert str(exc.value).startswith(f"{raw / name}{what}")
    assert isinstance(exc.value, ValueError)


def test_missing_and_ambiguous_files(tmp_path):
    with pytest.raises(PrepareError, match="raw data folder not found"):
        prepare_dataset("Toy", tmp_path / "nope", tmp_path / "d")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "Toy_items.tsv").write_text("i1\ta\n")
    with pytest.raises(PrepareError, match=r"0 users files matching am_\*_users\*.tsv \(none\)"):
        prepare_dataset("Toy", raw, tmp_path / "d")
    (raw / "am_Toy_users.tsv").write_text("u\ti1 i1 i1 i1 i1\n")
    (raw / "am_Toy_users_v2.tsv").write_text("u\ti1 i1 i1 i1 i1\n")
    with pytest.raises(PrepareError, match="2 users files .*am_Toy_users.tsv, am_Toy_users_v2.tsv"):
        prepare_dataset("Toy", raw, tmp_path / "d")


def test_cli_error_is_one_line(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw", "u1\ti1 i1 i1 i1 i1\nu2\ti1 i9\n", "i1\ta\n")
    rc = cli_main(["--dataset", "Toy", "--raw_dir", str(raw), "--data_path", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().count("\n") == 0 and err.startswith(f"error: {raw / 'am_Toy_users.tsv'}:2:")
    assert cli_main(["--dataset", "Toy", "--raw_dir", str(raw), "--data_path",
                     str(tmp_path / "d"), "--unknown_items", "drop", "--quiet"]) == 0


def test_cli_module_exit_code(tmp_path):
    raw = write_raw(tmp_path / "raw", "u1\ti1 i1 i1 i1 i1\n", "i1\ta\tb\n")
    proc = subprocess.run([sys.executable, "-m", "recbole_iisan.prepare", "--dataset", "Toy",
                           "--raw_dir", str(raw), "--data_path", str(tmp_path / "d")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {raw / 'Toy_items.tsv'}:1: expected 2 TAB-separated columns "
                                   f"(item id, title), found 3")
    assert "Traceback" not in proc.stderr


def _recbole_dataset(data_path: Path, name: str):
    from recbole.config import Config
    from recbole.data import create_dataset

    config = Config(model="SASRec", dataset=name, config_dict={
        "data_path": str(data_path),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
        "train_neg_sample_args": None, "show_progress": False,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                      "mode": "full"},
    })
    return create_dataset(config)


def test_recbole_loads_output(toy, tmp_path):
    out = tmp_path / "data"
    prepare_dataset("Toy", toy, out)
    ds = _recbole_dataset(out, "Toy")
    assert ds.user_num == 2 + 1 and ds.item_num == 6 + 1 and ds.inter_num == 11  # +1: padding
    words = ds.field2id_token["title"]
    items = ds.field2id_token["item_id"]
    item_feat = ds.item_feat  # a DataFrame until the dataset is built
    titles = {items[int(i)]: " ".join(words[int(t)] for t in seq)
              for i, seq in zip(item_feat["item_id"], item_feat["title"])}
    assert titles["i1"] == "First & best"
    assert titles["i2"] == "'' Industrial & Scientific'''' />''"
    assert titles["i3"] == "A 5'' ruler with tab"
    assert titles["i5"] == ""
    # RecBole's TO ordering reproduces the sequence, repeats included
    inter = ds.inter_feat.sort_values(["user_id", "timestamp"], kind="stable")
    u1 = ds.token2id("user_id", "u1")
    seq = inter.loc[inter["user_id"] == u1, "item_id"].tolist()
    assert [items[i] for i in seq] == ["i1", "i1", "i2", "i3", "i4"]


@pytest.mark.skipif(not SCIENTIFIC.is_dir(), reason="Scientific raw files not available")
def test_scientific_counts(tmp_path):
    paper = prepare_dataset("Scientific", SCIENTIFIC, tmp_path / "p", paper_protocol=True)
    assert (paper["users"], paper["items"], paper["interactions"]) == (12076, 20314, 81711)
    assert paper["truncated_users"] == 565 and paper["skipped_users"] == 0
    full = prepare_dataset("Scientific", SCIENTIFIC, tmp_path / "f")
    assert (full["users"], full["items"], full["interactions"]) == (12076, 20825, 85211)
    assert full["raw_interactions"] == 85211 and full["raw_items"] == 20825
    _, rows = read_rows(tmp_path / "f" / "Scientific" / "Scientific.item")
    assert not any(r[1].startswith('"') for r in rows)
    ds = _recbole_dataset(tmp_path / "p", "Scientific")
    assert (ds.user_num, ds.item_num, ds.inter_num) == (12077, 20315, 81711)
