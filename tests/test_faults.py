"""Fault injection: damaged checkpoints, zips and yaml files, full disks and bad values end in one
`error:` line (exit 2) or are survived, and nothing finished is lost.

Full disks are simulated: every write into a chosen folder writes part of its bytes and then
fails with ``OSError(ENOSPC)`` (``torch.save`` onto a path, and Python file objects opened there);
LMDB writes fail as a real full disk makes them fail (``mdb_txn_commit: Input/output error``,
measured on a 1 MiB tmpfs) or with ENOSPC.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from recbole_iisan.quick_start import cli
from recbole_iisan.utils.errors import EXIT_USER_ERROR

SASREC = ["--model=SASRec", "--dataset=tiny", "--train_batch_size=256", "--eval_batch_size=256",
          "--inner_size=32", "--n_layers=1", "--n_heads=1"]


def _run(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line(code: int, err: str, *expected: str) -> None:
    """Exit 2 and one ``error:`` line, the last on stderr (progress bars may come before it)."""
    assert code == EXIT_USER_ERROR, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.splitlines()[-1].startswith("error: "), err[-2000:]
    for e in expected:
        assert e in errors[0], err


def _strict_json(path: Path) -> dict:
    def refuse(c):
        raise ValueError(f"not strict JSON: {c}")

    return json.loads(path.read_text(), parse_constant=refuse)


# --------------------------------------------------------------------------------------------
# a trained tiny SASRec checkpoint (RecBole's real model and trainer)

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("trained")
    write_tiny_dataset(root)
    out = root / "first.json"
    code = cli.main([*SASREC, f"--data_path={root}", f"--checkpoint_dir={root / 'saved'}", f"--result_file={out}",
                     "--epochs=2", "--hidden_size=16", "--embedding_size=16"])
    assert code == 0
    res = json.loads(out.read_text())
    return {"data": root, "result": res, "checkpoint": Path(res["checkpoint"])}


def _copy(trained, tmp_path: Path, name: str = "ck.safetensors") -> Path:
    folder = tmp_path / "saved"
    folder.mkdir(exist_ok=True)
    dst = folder / name
    shutil.copyfile(trained["checkpoint"], dst)
    return dst


def _resume_args(trained, tmp_path: Path, ck: Path, *extra: str, hidden: int = 16) -> list[str]:
    return [*SASREC, f"--data_path={trained['data']}", f"--checkpoint_dir={ck.parent}",
            f"--result_file={tmp_path / 'resumed.json'}", f"--resume={ck}", f"--hidden_size={hidden}",
            f"--embedding_size={hidden}", *extra]


def _read(ck: Path) -> dict:
    """A checkpoint's state, read with safetensors and json alone (the format of
    recbole_iisan/trainer/checkpoint_file.py), not with the plugin's loader."""
    from safetensors import safe_open

    with safe_open(str(ck), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    from recbole_iisan.trainer.checkpoint_file import decode

    return decode(json.loads(meta["state"]), tensors)


def _write(state: dict, ck: Path) -> None:
    from recbole_iisan.trainer import checkpoint

    checkpoint.save(state, ck)


def _forget_best(ck: Path) -> None:
    """A copy whose best score is -inf: the first resumed epoch improves on it and saves."""
    state = _read(ck)
    state["best_valid_score"] = -np.inf
    _write(state, ck)


def test_resume_reports_the_whole_run_and_never_writes_the_resumed_file(trained, tmp_path, capsys):
    ck = _copy(trained, tmp_path)
    # learning rate 0 in the saved optimizer state (a resumed run takes its lr from there): the
    # resumed epochs cannot change the model, so the best epoch is still the first run's
    state = _read(ck)
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = 0.0
    _write(state, ck)
    before = ck.read_bytes()
    first = trained["result"]
    code, err = _run(capsys, *_resume_args(trained, tmp_path, ck, "--epochs=4"))
    assert code == 0, err[-2000:]
    res = _strict_json(tmp_path / "resumed.json")
    assert res["epochs_run"] == 4
    assert res["best_valid_result"] == first["best_valid_result"] != {}
    assert res["best_valid_score"] == pytest.approx(first["best_valid_score"])
    # equal scores count as improvements in RecBole's early stopping: the last one is the best
    assert res["best_epoch"] == 4
    assert ck.read_bytes() == before  # the resumed file is never written ...
    new = Path(res["checkpoint"])  # ... the run saved (and tested) its own
    assert new != ck and new.parent == ck.parent
    saved = _read(new)
    assert saved["epoch"] == 3 and len(saved["plugin_history"]["train_epoch_seconds"]) == 4


def test_resume_saves_a_better_model_to_a_new_name(trained, tmp_path, capsys, caplog):
    ck = _copy(trained, tmp_path)
    _forget_best(ck)
    before = ck.read_bytes()
    with caplog.at_level("INFO"):
        code, err = _run(capsys, *_resume_args(trained, tmp_path, ck, "--epochs=3"))
    assert code == 0, err[-2000:]
    res = _strict_json(tmp_path / "resumed.json")
    assert ck.read_bytes() == before  # the file resumed from is never written
    new = Path(res["checkpoint"])
    assert new != ck and new.parent == ck.parent and new.is_file()
    assert f"this run saves to {new}" in caplog.text
    saved = _read(new)
    assert saved["epoch"] >= trained["result"]["best_epoch"]  # a later epoch than the resumed one
    assert res["epochs_run"] == 3 and len(saved["plugin_history"]["valid_scores"]) <= 3


def test_resuming_a_finished_run_writes_nothing(trained, tmp_path, capsys):
    ck = _copy(trained, tmp_path)
    before = ck.read_bytes()
    best = trained["result"]["best_epoch"]  # the checkpoint holds epoch best-1: nothing left to train
    code, err = _run(capsys, *_resume_args(trained, tmp_path, ck, f"--epochs={best}"))
    assert code == 0, err[-2000:]
    res = _strict_json(tmp_path / "resumed.json")
    assert ck.read_bytes() == before and sorted(p.name for p in ck.parent.iterdir()) == ["ck.safetensors"]
    assert res["checkpoint"] == str(ck) and res["epochs_run"] == best
    assert res["best_valid_result"] == trained["result"]["best_valid_result"]


def _full_disk(monkeypatch, folder: Path) -> None:
    """Every write into ``folder`` writes half its bytes, then fails with ENOSPC."""
    folder = folder.resolve()

    def inside(p) -> bool:
        try:
            return Path(p).resolve().is_relative_to(folder)
        except (OSError, ValueError):
            return False

    def enospc(name):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and inside(f):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise enospc(f)
        return real_save(obj, f, *args, **kwargs)

    class FullFile(io.RawIOBase):
        def __init__(self, fh, name):
            self.fh, self.name_ = fh, name

        def write(self, data):
            self.fh.write(bytes(data)[: len(data) // 2])
            self.fh.flush()
            raise enospc(self.name_)

        def __getattr__(self, n):
            return getattr(self.fh, n)

        def close(self):
            self.fh.close()
            super().close()

    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        fh = real_fdopen(fd, mode, *args, **kwargs)
        target = os.readlink(f"/proc/self/fd/{fd}")
        if any(c in mode for c in "wa+") and inside(target):
            return FullFile(fh, target)
        return fh

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_checkpoint(trained, tmp_path, capsys, monkeypatch):
    ck = _copy(trained, tmp_path)
    _forget_best(ck)
    before = ck.read_bytes()
    _full_disk(monkeypatch, ck.parent)
    code, err = _run(capsys, *_resume_args(trained, tmp_path, ck, "--epochs=3"))
    monkeypatch.undo()
    _one_line(code, err, "disk full while saving checkpoint", str(ck.parent),
              f"the previous checkpoint {ck} is intact")
    assert ck.read_bytes() == before
    assert _read(ck)["epoch"] == trained["result"]["best_epoch"] - 1
    assert sorted(p.name for p in ck.parent.iterdir()) == ["ck.safetensors"]  # no temp or half file left


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _text(p: Path) -> None:
    p.write_text("epochs: 3\n")


def _no_state_dict(p: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, p)


def _missing_key(p: Path) -> None:
    state = _read(p)
    state["state_dict"].pop("position_embedding.weight")
    _write(state, p)


@pytest.mark.parametrize("damage, expected", [
    (_truncate, "truncated"),
    (_empty, "empty file (0 bytes)"),
    (_text, "not a torch checkpoint"),
    (_no_state_dict, "not a RecBole training checkpoint (no 'epoch', 'state_dict')"),
    (_missing_key, "1 parameter(s) missing (e.g. 'position_embedding.weight')"),
])
def test_a_checkpoint_that_does_not_load_is_one_line(trained, tmp_path, capsys, damage, expected):
    ck = _copy(trained, tmp_path)
    damage(ck)
    code, err = _run(capsys, *_resume_args(trained, tmp_path, ck, "--epochs=3"))
    _one_line(code, err, f"checkpoint {ck}", expected)


def test_a_checkpoint_of_another_model_size_is_one_line(trained, tmp_path, capsys):
    ck = _copy(trained, tmp_path)
    code, err = _run(capsys, *_resume_args(trained, tmp_path, ck, "--epochs=3", hidden=32))
    _one_line(code, err, f"checkpoint {ck}", "does not fit this model", "is [", "16]", "32]")


def test_a_missing_checkpoint_is_one_line(trained, tmp_path, capsys):
    ck = tmp_path / "saved" / "nope.safetensors"
    code, err = _run(capsys, *_resume_args(trained, tmp_path, ck, "--epochs=3"))
    _one_line(code, err, f"checkpoint {ck}: not found")


def test_result_file_is_strict_json_without_validation(tiny_data, tmp_path, capsys):
    """eval_step 0 (RecBole: no validation) leaves the best score at -inf: written as null."""
    out = tmp_path / "r.json"
    code, err = _run(capsys, *SASREC, f"--data_path={tiny_data}", f"--checkpoint_dir={tmp_path / 'ck'}",
                     f"--result_file={out}", "--epochs=1", "--eval_step=0", "--hidden_size=16",
                     "--embedding_size=16")
    assert code == 0, err[-2000:]
    res = _strict_json(out)
    assert res["best_valid_score"] is None and res["epochs_run"] == 1


# --------------------------------------------------------------------------------------------
# bad values, unknown keys, bad config files, duplicated keys: before any data is read

@pytest.mark.parametrize("args, expected", [
    (["--model=SASRec", "--epochs=0"], "config key 'epochs' must be >= 1, got 0"),
    (["--model=SASRec", "--epochs=-1"], "config key 'epochs' must be >= 1, got -1"),
    (["--model=SASRec", "--train_batch_size=0"], "config key 'train_batch_size' must be >= 1, got 0"),
    (["--model=SASRec", "--hidden_dropout_prob=1.5"], "'hidden_dropout_prob' must be >= 0 and < 1, got 1.5"),
    (["--model=IISANVS", "--sanb_size=0"], "config key 'sanb_size' must be >= 1, got 0"),
    (["--model=IISANVA", "--layer_scheme=bogus"], "config key 'layer_scheme' must be one of ['even', 'all'"),
    (["--model=IISANVA", "--layer_scheme=[1,-2]"], "'layer_scheme': a list of block indices must hold integers >= 0"),
    (["--model=IISANVS", "--fusion=concat"], "config key 'fusion' must be one of ['gated', 'add'], got 'concat'"),
    (["--model=IISANVS", "--missing_image=skip"], "config key 'missing_image' must be one of ['error', 'zeros']"),
    (["--model=SASRec", "--sanb_sise=8", "--strict"], "unknown config key 'sanb_sise' (did you mean 'sanb_size'?)"),
    (["--model=SASRec", "--epochs=3", "--epochs=4"], "config key 'epochs' is given twice on the command line (3 and 4)"),
])
def test_bad_values_are_one_line_before_any_data_is_read(args, expected, tmp_path, capsys):
    # the dataset does not exist: the config check must come first
    code, err = _run(capsys, *args, "--dataset=nosuch", f"--data_path={tmp_path}")
    _one_line(code, err, expected)


def test_epochs_zero_on_a_real_dataset_is_one_line(tiny_data, tmp_path, capsys):
    code, err = _run(capsys, *SASREC, f"--data_path={tiny_data}", f"--checkpoint_dir={tmp_path}", "--epochs=0")
    _one_line(code, err, "config key 'epochs' must be >= 1, got 0")
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.pth"))


@pytest.mark.parametrize("bad, expected", [
    ("--layer_scheme=bogus", "config key 'layer_scheme' must be one of ['even', 'all'"),
    ("--sanb_size=0", "config key 'sanb_size' must be >= 1, got 0"),
])
def test_bad_iisan_values_on_a_real_dataset_are_one_line(bad, expected, tiny_data, tiny_bert, tmp_path, capsys):
    code, err = _run(capsys, *_iisan_args(tiny_data, tiny_bert, tmp_path), bad)
    _one_line(code, err, expected)
    assert not (tmp_path / "cache").exists()  # refused before the cache is built


def test_unknown_key_warns_with_the_closest_documented_key(tiny_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, err = _run(capsys, *SASREC, f"--data_path={tiny_data}", f"--checkpoint_dir={tmp_path}",
                     f"--result_file={out}", "--epochs=1", "--hidden_size=16", "--embedding_size=16",
                     "--sanb_sise=8", "--stoping_step=2")
    assert code == 0
    assert "warning: unknown config key 'sanb_sise' (did you mean 'sanb_size'?)" in err
    assert "warning: unknown config key 'stoping_step' (did you mean 'stopping_step'?)" in err
    # documented keys (RecBole's and the plugin's, per-tower keys) are not reported
    assert "hidden_size" not in err and "data_path" not in err


def test_per_tower_and_recbole_keys_are_documented():
    from recbole_iisan.config.checks import unknown_keys

    cfg = {"towers": ["text", "text2"], "text2_encoder": "x", "text2_fields": ["title"], "text2_max_length": 8,
           "train_neg_sample_args": None, "eval_step": 1, "text3_encoder": "y", "MAX_ITEM_LIST_LENGTH": 5,
           "neg_sampling": None}  # RecBole 1.2 replaced neg_sampling by train_neg_sample_args
    assert [k for k, _ in unknown_keys(cfg)] == ["text3_encoder", "neg_sampling"]
    assert dict(unknown_keys(cfg))["text3_encoder"] in ("text_encoder", "text2_encoder")


def _yaml_error(p: Path) -> str:
    p.write_text("epochs: 3\ntrain_batch_size: [64, 128\nlearning_rate: 0.1\n")
    return f"{p}:3: yaml syntax error"


def _yaml_list(p: Path) -> str:
    p.write_text("- epochs: 3\n- learning_rate: 0.1\n")
    return f"{p}: expected a mapping of config keys (key: value lines), got a list"


def _yaml_binary(p: Path) -> str:
    p.write_bytes(b"\xff\xfe\x00epochs")
    return f"{p}: not a text (UTF-8) yaml file"


@pytest.mark.parametrize("make", [_yaml_error, _yaml_list, _yaml_binary])
def test_bad_config_file_is_one_line_naming_the_file(make, tiny_data, tmp_path, capsys):
    yml = tmp_path / "bad.yaml"
    expected = make(yml)
    code, err = _run(capsys, *SASREC, f"--data_path={tiny_data}", f"--config_files={yml}")
    _one_line(code, err, expected)


def test_an_empty_config_file_is_fine(tiny_data, tmp_path, capsys):
    """A yaml file holding only comments (RecBole's Config fails on it with a TypeError)."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    code, err = _run(capsys, *SASREC, f"--data_path={tiny_data}", f"--config_files={empty}", "--epochs=1",
                     f"--checkpoint_dir={tmp_path}", f"--result_file={tmp_path / 'r.json'}")
    assert code == 0, err[-2000:]


def test_a_search_space_that_can_sample_a_bad_value_is_refused_before_ray(tiny_data, tmp_path, monkeypatch):
    from recbole_iisan.quick_start import tune as tuning
    from recbole_iisan.utils.errors import PluginConfigError

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for a bad search space")

    monkeypatch.setattr(tuning, "_ray_init", no_ray)
    cases = [("layer_scheme choice ['even','bogus']\n", "layer_scheme"),
             ("sanb_size choice [0,8]\n", "'sanb_size' must be >= 1, got 0"),
             ("hidden_dropout_prob uniform 0.1,1.5\n", "'hidden_dropout_prob' must be >= 0 and < 1, got 1.5"),
             ("sanb_sise choice [8,16]\n", "unknown config key 'sanb_sise' (did you mean 'sanb_size'?)")]
    for line, expected in cases:
        hyper = tmp_path / "hyper.test"
        hyper.write_text("learning_rate loguniform -9,-7\n" + line)
        with pytest.raises(PluginConfigError) as info:
            tuning.run_search("IISANVS", "tiny", str(hyper), config_dict={"data_path": str(tiny_data)},
                              storage_path=str(tmp_path / "ray"), num_samples=2)
        assert f"{hyper}:2: " in str(info.value) and expected in str(info.value)


# --------------------------------------------------------------------------------------------
# images: a damaged zip

def _jpeg(seed: int) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _zip_with_corrupt_deflate(path: Path) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i in range(4):
            z.writestr(f"imgs/i{i}.jpg", _jpeg(i) + b"\0" * 2000)  # compressible: real deflate data
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("imgs/i2.jpg")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(start + 2, start + 40):
        data[k] ^= 0xA5  # damage the deflate stream of i2, leave the zip directory intact
    path.write_bytes(bytes(data))


def test_corrupt_deflate_member_is_recorded_unreadable(tmp_path):
    from recbole_iisan.data.images import ImageStore, import_images

    src = tmp_path / "images.zip"
    _zip_with_corrupt_deflate(src)
    report = import_images(src, tmp_path / "store.lmdb", item_tokens=[f"i{i}" for i in range(5)], progress=False)
    assert report.n_stored == 3 and report.missing == ["i4"]
    assert [tok for tok, _ in report.unreadable] == ["i2"] and "cannot read" in report.unreadable[0][1]
    assert "zlib" in report.unreadable[0][1] or "decompress" in report.unreadable[0][1]
    with ImageStore(tmp_path / "store.lmdb") as store:
        assert sorted(store.keys()) == ["i0", "i1", "i3"]


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_truncated_zip_is_one_line_naming_the_zip(tmp_path, capsys, cut):
    from recbole_iisan import prepare
    from conftest import write_tiny_dataset

    write_tiny_dataset(tmp_path, name="tiny")
    src = tmp_path / "images.zip"
    with zipfile.ZipFile(src, "w") as z:
        for i in range(3):
            z.writestr(f"i{i}.jpg", _jpeg(i))
    src.write_bytes(src.read_bytes()[: int(src.stat().st_size * cut)])
    code = prepare.main(["--dataset", "tiny", "--data_path", str(tmp_path), "--images", str(src), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(src) in err and "cannot be read" in err


# --------------------------------------------------------------------------------------------
# a full disk while the encoder cache is built

def _iisan_args(data: Path, bert: str, tmp_path: Path) -> list[str]:
    return ["--model=IISANVS", "--dataset=tiny", f"--data_path={data}", f"--checkpoint_dir={tmp_path / 'ck'}",
            f"--cache_dir={tmp_path / 'cache'}", "--towers=['text','text2']", f"--text_encoder={bert}",
            f"--text2_encoder={bert}", "--text_fields=['title']", "--text2_fields=['title']",
            "--epochs=1", "--embedding_size=16", "--inner_size=32", "--encoder_batch_size=16"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from test_encoders import make_tiny_bert

    return str(make_tiny_bert(tmp_path_factory.mktemp("enc") / "bert"))


class _Txn:
    def __init__(self, txn, fault):
        self._txn, self._fault = txn, fault

    def __getattr__(self, name):
        return getattr(self._txn, name)

    def __enter__(self):
        self._txn.__enter__()
        return self

    def __exit__(self, *exc):
        return self._txn.__exit__(*exc)

    def put(self, *a, **k):
        raise self._fault()

    def commit(self):
        raise self._fault()


class _Env:
    def __init__(self, env, fault):
        self._env, self._fault = env, fault

    def __getattr__(self, name):
        return getattr(self._env, name)

    def begin(self, *a, write=False, **k):
        txn = self._env.begin(*a, write=write, **k)
        return _Txn(txn, self._fault) if write else txn


@pytest.mark.parametrize("kind", ["enospc", "lmdb_eio"])
def test_disk_full_during_cache_build_is_one_line(kind, tiny_data, tiny_bert, tmp_path, capsys, monkeypatch):
    import lmdb

    cache = tmp_path / "cache"
    if kind == "enospc":
        def fault():
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:  # what LMDB raises on a full filesystem; the folder's filesystem has (almost) no room left
        def fault():
            return lmdb.Error("mdb_txn_commit: Input/output error")

        real_usage = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage",
                            lambda p: real_usage(p)._replace(free=4096) if Path(p).resolve().is_relative_to(tmp_path.resolve())
                            else real_usage(p))
    real_open = lmdb.open

    def open_(path, *a, **k):
        env = real_open(path, *a, **k)
        if Path(path).resolve().is_relative_to(cache.resolve()) and not k.get("readonly"):
            return _Env(env, fault)
        return env

    monkeypatch.setattr(lmdb, "open", open_)
    args = _iisan_args(tiny_data, tiny_bert, tmp_path)
    code, err = _run(capsys, *args)
    _one_line(code, err, f"disk full while writing {cache}", "free space and re-run; finished work is kept")
    monkeypatch.undo()
    code, err = _run(capsys, *args, f"--result_file={tmp_path / 'r.json'}")  # space freed: the run goes through
    assert code == 0, err[-2000:]


def test_disk_full_during_build_cache_is_one_line(tiny_data, tiny_bert, tmp_path, capsys, monkeypatch):
    """``python -m recbole_iisan.build_cache`` on a full disk (LMDB's own report of it)."""
    import lmdb

    from recbole_iisan import build_cache

    cache = tmp_path / "cache"
    real_open, real_usage = lmdb.open, shutil.disk_usage

    def open_(path, *a, **k):
        env = real_open(path, *a, **k)
        full = Path(path).resolve().is_relative_to(cache.resolve()) and not k.get("readonly")
        return _Env(env, lambda: lmdb.Error("mdb_txn_commit: Input/output error")) if full else env

    monkeypatch.setattr(lmdb, "open", open_)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
    argv = ["--dataset", "tiny", "--data_path", str(tiny_data), "--model", "IISANVS", "--towers=[text, text2]",
            f"--text_encoder={tiny_bert}", f"--text2_encoder={tiny_bert}", "--text_fields=[title]",
            "--text2_fields=[title]", f"--cache_dir={cache}"]
    assert build_cache.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [f"error: disk full while writing {cache}: free space and re-run; "
                   f"finished work is kept"]
