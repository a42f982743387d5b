"""IISAN end to end through the plugin's own path: atomic files -> encoder cache ->
MultimodalSequentialDataset -> model -> RecBole Trainer/evaluator -> result file."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import reference_hit_ndcg
from recbole_iisan.quick_start import cli
from recbole_iisan.utils.errors import EXIT_USER_ERROR

FAST = ["--epochs=2", "--train_batch_size=64", "--eval_batch_size=128", "--embedding_size=16",
        "--sanb_size=8", "--inner_size=32", "--encoder_batch_size=16", "--stopping_step=1"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from test_encoders import make_tiny_bert, make_tiny_llama

    root = tmp_path_factory.mktemp("enc")
    return {"bert": str(make_tiny_bert(root / "bert")), "bert2": str(make_tiny_bert(root / "bert2", seed=1)),
            "llama": str(make_tiny_llama(root / "llama"))}


def _args(data: Path, tmp: Path, encoders: dict, *extra: str) -> list[str]:
    return [f"--data_path={data}", f"--checkpoint_dir={tmp / 'ckpt'}", f"--cache_dir={tmp / 'cache'}",
            "--towers=['text','text2']", "--text_fields=['title']", "--text2_fields=['title']",
            f"--text2_encoder={encoders['bert']}", *FAST, *extra]


def test_iisanva_llama_and_bert_towers_end_to_end(tiny_data: Path, tmp_path: Path, encoders: dict) -> None:
    out = tmp_path / "va.json"
    code = cli.main(["--model=IISANVA", "--dataset=tiny", f"--result_file={out}",
                     *_args(tiny_data, tmp_path, encoders, f"--text_encoder={encoders['llama']}")])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["model"] == "IISANVA" and set(res["test_result"]) == {"hit@10", "ndcg@10"}
    assert set(res["gate_values"]) == {"text", "text2", "inter"}
    assert all(0.0 < g < 1.0 for gs in res["gate_values"].values() for g in gs)
    # the cache was built once per tower, with a manifest and a completion marker
    caches = sorted(p.parent.name for p in (tmp_path / "cache").rglob("COMPLETE"))
    assert len(caches) == 2 and caches[0].startswith("text-") and caches[1].startswith("text2-")


def test_dataset_rows_are_the_cached_states_in_recbole_id_order(tiny_data: Path, tmp_path: Path, encoders: dict) -> None:
    from recbole_iisan.config.configurator import build_config
    from recbole_iisan.data import cache as cache_mod
    from recbole_iisan.data.dataset import MultimodalSequentialDataset

    cfg = build_config("IISANVS", "tiny", config_dict={
        "data_path": str(tiny_data), "cache_dir": str(tmp_path / "cache"), "towers": ["text", "text2"],
        "text_encoder": encoders["bert"], "text2_encoder": encoders["bert2"], "text_fields": ["title"],
        "text2_fields": ["title"], "cache_dtype": "float32"})
    from recbole_iisan.data.utils import prepare_inputs

    prepare_inputs(cfg)  # the pipeline step: caches first, then the dataset only loads
    ds = MultimodalSequentialDataset(cfg)
    assert ds.towers == ["text", "text2"]
    for tower in ds.towers:
        states = ds.item_states[tower]
        assert states.is_contiguous() and states.shape[0] == ds.item_num
        assert torch.count_nonzero(states[0]) == 0  # padding row
        assert ds.item_state_layers[tower] == [0, 2, 4]  # 4-layer encoder, 'even' + embedding state
    # a direct forward pass of the encoder for three items equals their rows
    from recbole_iisan.towers.encoders import load_frozen_encoder
    from recbole_iisan.towers.spec import tower_specs

    spec = tower_specs(cfg, ["item_id", "title"])[1]
    enc = load_frozen_encoder(spec, "cpu")
    titles = dict(line.split("\t") for line in (tiny_data / "tiny" / "tiny.item").read_text().splitlines()[1:])
    ids = [1, 5, ds.item_num - 1]
    tokens = [ds.id2token(ds.iid_field, i) for i in ids]
    direct = enc.encode([titles[t] for t in tokens], layers=[0, 2, 4])
    torch.testing.assert_close(ds.item_states["text2"][ids], direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ds.item_states["text"][ids], ds.item_states["text2"][ids])
    assert cache_mod.is_complete(next((tmp_path / "cache").glob("text2-*")))


def test_metrics_equal_a_hand_computation_from_full_sort_predict(tiny_data: Path, tmp_path: Path, encoders: dict) -> None:
    """RecBole's evaluator on our model == ranks computed by hand from full_sort_predict."""
    from recbole.data import data_preparation

    from recbole_iisan.config.configurator import build_config, get_model_class
    from recbole_iisan.data.utils import create_dataset, prepare_inputs
    from recbole_iisan.trainer.trainer import PluginTrainer

    cfg = build_config("IISANVS", "tiny", config_dict={
        "data_path": str(tiny_data), "cache_dir": str(tmp_path / "cache"), "towers": ["text", "text2"],
        "text_encoder": encoders["bert"], "text2_encoder": encoders["bert2"], "text_fields": ["title"],
        "text2_fields": ["title"], "embedding_size": 16, "sanb_size": 8, "eval_batch_size": 1000})
    cls = get_model_class("IISANVS")
    prepare_inputs(cfg, cls)
    ds = create_dataset(cfg, cls)
    _, _, test = data_preparation(cfg, ds)
    model = cls(cfg, test._dataset)
    model.eval()
    trainer = PluginTrainer(cfg, model)
    result = trainer.evaluate(test, load_best_model=False)
    hits, ndcgs = reference_hit_ndcg(model, test)
    assert result["hit@10"] == pytest.approx(round(float(np.mean(hits)), 4), abs=1e-4)
    assert result["ndcg@10"] == pytest.approx(round(float(np.mean(ndcgs)), 4), abs=1e-4)


def test_compare_writes_one_table(tiny_data: Path, tmp_path: Path, encoders: dict, capsys) -> None:
    path = tmp_path / "cmp.csv"
    code = cli.main(["--dataset=tiny", "--compare=SASRec,IISANVS", f"--compare_file={path}",
                     *_args(tiny_data, tmp_path, encoders, f"--text_encoder={encoders['bert2']}",
                            "--hidden_size=16", "--n_layers=1", "--n_heads=1")])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = list(csv.DictReader(path.open()))
    assert [r["model"] for r in rows] == ["SASRec", "IISANVS"]
    assert all(0.0 <= float(r["test_ndcg@10_mean"]) <= float(r["test_hit@10_mean"]) <= 1.0 for r in rows)
    assert "| SASRec " in out and "| IISANVS " in out


def test_compare_columns_follow_topk_and_each_model_reports_its_own_peak(tiny_data: Path, tmp_path: Path,
                                                                        encoders: dict, capsys) -> None:
    path = tmp_path / "cmp20.csv"
    code = cli.main(["--dataset=tiny", "--compare=SASRec,IISANVS", f"--compare_file={path}", "--topk=[20]",
                     "--valid_metric=NDCG@20",
                     *_args(tiny_data, tmp_path, encoders, f"--text_encoder={encoders['bert2']}",
                            "--hidden_size=16", "--n_layers=1", "--n_heads=1")])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = list(csv.DictReader(path.open()))
    assert "test_hit@20_mean" in rows[0] and "test_ndcg@20_mean" in rows[0] and "test_hit@10_mean" not in rows[0]
    assert all(0.0 <= float(r["test_ndcg@20_mean"]) <= float(r["test_hit@20_mean"]) <= 1.0 for r in rows)
    # each child measures its own VmHWM: the figures differ (the parent's ru_maxrss would be inherited)
    peaks = [float(r["peak_mb"]) for r in rows]
    assert all(p > 50 for p in peaks) and peaks[0] != peaks[1]


def test_a_valid_metric_that_is_not_computed_is_one_line(tiny_data: Path, capsys) -> None:
    code = cli.main(["--dataset=tiny", "--model=SASRec", f"--data_path={tiny_data}", "--topk=[20]"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and err.count("\n") == 1
    assert "config key 'valid_metric' is 'NDCG@10', which this run does not compute" in err


def test_resume_from_checkpoint_continues_training(tiny_data: Path, tmp_path: Path, encoders: dict,
                                                   caplog) -> None:
    first = tmp_path / "first.json"
    args = _args(tiny_data, tmp_path, encoders, f"--text_encoder={encoders['bert2']}")
    assert cli.main(["--model=IISANVS", "--dataset=tiny", f"--result_file={first}", *args]) == 0
    ckpt = json.loads(first.read_text())["checkpoint"]
    from safetensors import safe_open

    with safe_open(ckpt, "pt") as f:  # the checkpoint's tensors and metadata, read by safetensors alone
        names, state = list(f.keys()), json.loads(f.metadata()["state"])
    assert any(k.startswith("state_dict/") for k in names)
    assert not any("states_" in k for k in names)  # cached states stay out
    second = tmp_path / "second.json"
    caplog.set_level(logging.INFO)
    assert cli.main(["--model=IISANVS", "--dataset=tiny", f"--resume={ckpt}", f"--result_file={second}",
                     *[a for a in args if not a.startswith("--epochs")], "--epochs=4"]) == 0
    res, done = json.loads(second.read_text()), state["epoch"] + 1
    assert f"resuming at epoch {done}" in caplog.text
    # the result counts the checkpoint's epochs (its history) and the ones run after it, at most to --epochs
    assert done < res["epochs_run"] <= 4
    assert res["train_losses"][:done] == json.loads(first.read_text())["train_losses"][:done]


def test_image_model_without_images_is_one_clear_line(tiny_data: Path, tmp_path: Path, encoders: dict, capsys) -> None:
    from test_encoders import make_tiny_vit

    vit = make_tiny_vit(tmp_path / "vit")
    capsys.readouterr()  # drop the progress bars of saving the tiny model
    code = cli.main(["--model=IISANVA", "--dataset=tiny", f"--data_path={tiny_data}", f"--cache_dir={tmp_path / 'c'}",
                     "--towers=['text','image']", f"--text_encoder={encoders['bert']}", f"--image_encoder={vit}",
                     "--text_fields=['title']", "--epochs=1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == EXIT_USER_ERROR
    assert len(err) == 1 and "image" in err[0] and "--image_dir" in err[0]


def test_iisanvs_on_towers_of_different_size_is_one_clear_line(tiny_data: Path, tmp_path: Path, encoders: dict,
                                                               capsys) -> None:
    code = cli.main(["--model=IISANVS", "--dataset=tiny",
                     *_args(tiny_data, tmp_path, encoders, f"--text_encoder={encoders['llama']}")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == EXIT_USER_ERROR
    assert len(err) == 1 and "IISANVS needs" in err[0] and "IISANVA" in err[0]
