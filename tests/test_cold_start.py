"""Cold-start split (cold_start_items): held-out items never reach training, the test keeps the
users whose target is held out, and every model gets the same split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


def _split(data: Path, model: str, frac: float):
    from recbole.data import data_preparation

    from recbole_iisan.evaluator.cold_start import apply
    from recbole_iisan.config.configurator import build_config, get_model_class
    from recbole_iisan.data.utils import create_dataset

    cfg = build_config(model, "tiny", config_dict={"data_path": str(data), "cold_start_items": frac,
                                                   "hidden_size": 16, "n_layers": 1, "n_heads": 1})
    ds = apply(cfg, create_dataset(cfg, get_model_class(model)))
    return ds, data_preparation(cfg, ds)


def test_held_out_items_leave_training_entirely(tiny_data: Path) -> None:
    ds, (train, valid, test) = _split(tiny_data, "SASRec", 0.2)
    held = torch.as_tensor(ds.cold_items)
    assert len(held) == round(0.2 * (ds.item_num - 1))
    tr = train._dataset.inter_feat
    seq, n = tr["item_id_list"], tr["item_length"]
    real = torch.arange(seq.size(1))[None] < n[:, None]
    assert not torch.isin(tr["item_id"], held).any()
    assert not (torch.isin(seq, held) & real).any()  # nor in any training input
    assert (seq[~real] == 0).all() and (n > 0).all()
    # the kept items of a row stay in order: each row's input is its original input minus held-out items
    _, (train0, valid0, test0) = _split(tiny_data, "SASRec", 0.0)
    t0 = train0._dataset.inter_feat
    hs = set(held.tolist())
    expected = [(int(t), [int(x) for x in s0[:l0] if int(x) not in hs])
                for t, s0, l0 in zip(t0["item_id"], t0["item_id_list"], t0["item_length"]) if int(t) not in hs]
    expected = [e for e in expected if e[1]]
    got = [(int(t), [int(x) for x in s1[:l1]]) for t, s1, l1 in zip(tr["item_id"], seq, n)]
    assert got == expected
    te = test._dataset.inter_feat
    assert len(te) > 0 and torch.isin(te["item_id"], held).all()
    assert len(te) == int(torch.isin(test0._dataset.inter_feat["item_id"], held).sum())
    assert len(valid._dataset) == len(valid0._dataset)
    # IISAN models get the same held-out items (same seed, same RecBole ids)
    ds2, _ = _split(tiny_data, "GRU4Rec", 0.2)
    np.testing.assert_array_equal(ds2.cold_items, ds.cold_items)


def test_cold_start_run_scores_only_unseen_targets(tiny_data: Path, tmp_path: Path) -> None:
    from recbole_iisan.quick_start.pipeline import run

    out = tmp_path / "r.json"
    run("SASRec", "tiny", config_dict={"data_path": str(tiny_data), "checkpoint_dir": str(tmp_path / "ck"),
                                       "cold_start_items": 0.2, "epochs": 1, "hidden_size": 16, "n_layers": 1,
                                       "n_heads": 1, "inner_size": 32}, result_file=str(out))
    bd = json.loads(out.read_text())["breakdown"]
    assert bd["target_frequency"]["0"]["n"] == bd["overall"]["n"] > 0  # every test target unseen in training


def test_bad_fraction_is_one_line(tiny_data: Path) -> None:
    from recbole_iisan.utils.errors import PluginConfigError

    with pytest.raises(PluginConfigError, match="cold_start_items"):
        _split(tiny_data, "SASRec", 1.5)


def test_compare_breakdown_on_the_cold_start_split(tiny_data: Path, tmp_path: Path, capsys) -> None:
    """--compare --breakdown: one table per breakdown and a PNG; both models on the same cold split."""
    import csv

    from recbole_iisan.quick_start import cli

    path = tmp_path / "cmp.csv"
    code = cli.main(["--dataset=tiny", "--compare=SASRec,GRU4Rec", "--breakdown", f"--compare_file={path}",
                     f"--data_path={tiny_data}", f"--checkpoint_dir={tmp_path / 'ck'}", "--cold_start_items=0.2",
                     "--epochs=1", "--hidden_size=16", "--n_layers=1", "--n_heads=1", "--inner_size=32",
                     "--embedding_size=16"])
    assert code == 0
    out = capsys.readouterr().out
    assert "hit@10 by target frequency:" in out and "| SASRec " in out and "| GRU4Rec " in out
    png = tmp_path / "cmp-breakdown.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(path)))
    assert [r["model"] for r in rows] == ["SASRec", "GRU4Rec"]
    # the same test users (all with an unseen target) for both models: one "0" bucket count
    line = [ln for ln in out.split("hit@10 by target frequency:")[1].splitlines() if ln.startswith("| SASRec")][0]
    line2 = [ln for ln in out.split("hit@10 by target frequency:")[1].splitlines() if ln.startswith("| GRU4Rec")][0]
    n_sas = line.split("|")[2].split("(")[1].rstrip(") ")
    n_gru = line2.split("|")[2].split("(")[1].rstrip(") ")
    assert n_sas == n_gru and int(n_sas) > 0
