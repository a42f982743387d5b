"""Comparisons a reviewer can accept: equal supervision, several seeds, per-user metrics, paired
tests, runs that resume exactly, the authors' selection rule (recbole_iisan/comparison.py,
report.py, trainer.py)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import reference_hit_ndcg
from recbole_iisan.quick_start import cli
from recbole_iisan.utils.errors import EXIT_USER_ERROR

SMALL = ["--embedding_size=16", "--hidden_size=16", "--sanb_size=8", "--inner_size=32", "--n_layers=1",
         "--n_heads=1", "--encoder_batch_size=64", "--eval_batch_size=512"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    from test_encoders import make_tiny_bert

    return str(make_tiny_bert(tmp_path_factory.mktemp("enc") / "bert"))


def _towers(bert: str, cache: Path) -> list[str]:
    return [f"--cache_dir={cache}", "--towers=['text','text2']", f"--text_encoder={bert}", f"--text2_encoder={bert}"]


def test_ml100k_paper_protocol_compare_with_two_seeds_writes_equal_targets_mean_std_and_p(
        tmp_path: Path, bert: str, capsys) -> None:
    """The issue's command: --dataset=ml-100k --compare=SASRec,GRU4Rec,IISANVS --paper_protocol
    --seeds=1,2 --epochs=1 (tiny encoders)."""
    out_dir = tmp_path / "res"
    code = cli.main(["--dataset=ml-100k", "--compare=SASRec,GRU4Rec,IISANVS", "--paper_protocol", "--seeds=1,2",
                     "--epochs=1", f"--results_dir={out_dir}", f"--checkpoint_dir={tmp_path / 'ck'}",
                     *_towers(bert, tmp_path / "cache"), *SMALL])
    printed = capsys.readouterr().out
    assert code == 0, printed[-2000:]
    rows = list(csv.DictReader((out_dir / "compare.csv").open()))
    assert [r["model"] for r in rows] == ["SASRec", "GRU4Rec", "IISANVS"]
    # equal supervision: every ml-100k user has >= 13 interactions, so each user's window of 13 gives
    # 13 - 3 = 10 training targets (s[1..10] of the train sequence s[0:11])
    import recbole

    inter = Path(recbole.__file__).parent / "dataset_example" / "ml-100k" / "ml-100k.inter"
    users = {}
    for line in inter.read_text().splitlines()[1:]:
        users[line.split("\t")[0]] = users.get(line.split("\t")[0], 0) + 1
    expected = sum(min(n, 13) - 3 for n in users.values())
    assert expected == 943 * 10
    assert {r["train_targets"] for r in rows} == {str(expected)}
    for r in rows:  # mean +- std over the two seeds
        assert r["n_runs"] == "2" and r["seeds"] == "1 2"
        assert float(r["test_hit@10_std"]) >= 0.0 and 0.0 <= float(r["test_ndcg@10_mean"]) <= float(r["test_hit@10_mean"])
    assert rows[0]["p_value"] == "" and all(0.0 <= float(r["p_holm"]) <= 1.0 for r in rows[1:])
    assert all(float(r["ci_low"]) <= float(r["diff_hit@10"]) <= float(r["ci_high"]) for r in rows[1:])
    # the printed table: mean ± std, a p column, the epoch-cap mark and its one-line warning
    assert "± " in printed and "p (Holm)" in printed and "†2" in printed
    assert "warning: still improving at the epoch cap" in printed
    # per-user files: the same 943 users for every run; their mean is the run's (rounded) test metric
    per_run = sorted(out_dir.glob("*-seed*.json"))
    assert len(per_run) == 6
    user_sets = []
    for f in per_run:
        r = json.loads(f.read_text())
        assert r["converged"] is False and r["train_targets"] == expected and r["train_batch_size"] == 64
        table = list(csv.DictReader((out_dir / r["per_user_file"]).open()))
        user_sets.append([t["user_id"] for t in table])
        for key in ("hit@10", "ndcg@10"):
            assert abs(np.mean([float(t[key]) for t in table]) - r["test_result"][key]) <= 5e-5 + 1e-12
    assert all(u == user_sets[0] for u in user_sets) and len(user_sets[0]) == 943
    # the report command renders the same table from the files
    capsys.readouterr()
    from recbole_iisan.quick_start import results as report

    assert report.main([str(out_dir)]) == 0
    assert capsys.readouterr().out.strip() == (out_dir / "compare.md").read_text().strip()


def test_per_user_metrics_equal_an_independent_rank_computation(tiny_data: Path, tmp_path: Path) -> None:
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_iisan.config.configurator import build_config
    from recbole_iisan.data.utils import create_dataset
    from recbole_iisan.trainer.trainer import PluginTrainer

    cfg = build_config("SASRec", "tiny", config_dict={"data_path": str(tiny_data), "hidden_size": 16,
                                                       "inner_size": 32, "checkpoint_dir": str(tmp_path)})
    init_seed(0, True)
    ds = create_dataset(cfg, type(None))
    _, _, test = data_preparation(cfg, ds)
    from recbole.model.sequential_recommender import SASRec

    model = SASRec(cfg, test._dataset).eval()
    trainer = PluginTrainer(cfg, model)
    result = trainer.evaluate(test, load_best_model=False)
    hits, ndcgs = reference_hit_ndcg(model, test)
    np.testing.assert_allclose(trainer.evaluator.per_user["hit@10"], hits)
    np.testing.assert_allclose(trainer.evaluator.per_user["ndcg@10"], ndcgs, rtol=1e-6)
    assert result["ndcg@10"] == round(float(np.mean(ndcgs)), 4)
    assert trainer.evaluator.unrounded["ndcg@10"] == pytest.approx(float(np.mean(ndcgs)), rel=1e-12)


def test_the_authors_rule_keeps_the_first_of_tied_epochs_and_counts_a_tie_as_no_improvement() -> None:
    import recbole.trainer.trainer as rb_trainer

    from recbole_iisan.trainer.checkpoint import best_index
    from recbole_iisan.utils.compat import strict_improvement

    scores = [0.10, 0.20, 0.20, 0.15, 0.20]

    def walk():
        best, step, updates, stops = -np.inf, 0, [], []
        for e, v in enumerate(scores):
            best, step, stop, update = rb_trainer.early_stopping(v, best, step, max_step=2, bigger=True)
            updates += [e] if update else []
            stops += [e] if stop else []
        return updates, stops

    assert walk() == ([0, 1, 2, 4], [])          # RecBole: a tie is an improvement, patience restarts
    with strict_improvement():
        assert walk() == ([0, 1], [4])           # the authors: epochs 2, 3, 4 do not improve -> stop at 4
    assert walk() == ([0, 1, 2, 4], [])          # outside the context RecBole's rule is back
    assert best_index(scores) == 4 and best_index(scores, first=True) == 1


def _run_tiny(tiny_data: Path, tmp: Path, name: str, epochs: int, resume=None, **extra) -> dict:
    from recbole_iisan.quick_start.pipeline import run

    d = {"data_path": str(tiny_data), "cache_dir": str(tmp / "cache"), "towers": ["text", "text2"],
         "text_encoder": extra.pop("bert"), "text2_encoder": extra.pop("bert2"), "text_fields": ["title"],
         "text2_fields": ["title"], "embedding_size": 16, "sanb_size": 8, "inner_size": 32, "n_layers": 1,
         "n_heads": 1, "epochs": epochs, "train_batch_size": 16, "checkpoint_dir": str(tmp / "ck"),
         "stopping_step": 20, **extra}
    return run("IISANVS", "tiny", config_dict=d, result_file=str(tmp / f"{name}.json"),
               checkpoint_file=str(tmp / "ck" / f"{name}.safetensors"), last_checkpoint_file=str(tmp / "ck" / f"{name}-last.safetensors"),
               resume=resume)


def test_an_interrupted_run_resumes_exactly_where_it_stopped(tiny_data: Path, tmp_path: Path, bert: str) -> None:
    from test_encoders import make_tiny_bert

    bert2 = str(make_tiny_bert(tmp_path / "bert2", seed=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = _run_tiny(tiny_data, tmp_path, "straight", 4, bert=bert, bert2=bert2)
        _run_tiny(tiny_data, tmp_path, "cut", 2, bert=bert, bert2=bert2)  # "killed" after epoch 2
        resumed = _run_tiny(tiny_data, tmp_path, "cut", 4, resume=str(tmp_path / "ck" / "cut-last.safetensors"),
                            bert=bert, bert2=bert2)
    finally:
        torch.set_num_threads(threads)
    assert len(straight["train_losses"]) == 4 and straight["train_losses"][0] != straight["train_losses"][3]
    assert resumed["train_losses"] == straight["train_losses"]  # bitwise: same data order, dropout and updates
    assert resumed["valid_scores"] == straight["valid_scores"]
    assert resumed["test_result"] == straight["test_result"] and resumed["best_epoch"] == straight["best_epoch"]
    assert resumed["epochs_run"] == 4


def test_the_authors_rule_selects_on_the_unrounded_score(tiny_data: Path, tmp_path: Path, bert: str) -> None:
    from test_encoders import make_tiny_bert

    bert2 = str(make_tiny_bert(tmp_path / "bert2", seed=1))
    r = _run_tiny(tiny_data, tmp_path, "sel", 3, bert=bert, bert2=bert2, selection_rule="authors", valid_metric="Hit@10")
    # 60 validation users: a hit rate is k / 60, which 4 decimals cannot hold exactly
    assert all(abs(v * 60 - round(v * 60)) < 1e-9 for v in r["valid_scores"])
    assert r["best_epoch"] == 1 + int(np.argmax(r["valid_scores"]))  # the first of the best


def test_results_folder_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from recbole_iisan.quick_start import results as report

    assert report.main([str(tmp_path / "nowhere")]) == EXIT_USER_ERROR
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "A-seed1.json").write_text("{not json")
    assert report.main([str(tmp_path / "d")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
    assert "nowhere" in err[0] and "A-seed1.json: not a JSON result file" in err[1]


def test_two_runs_with_other_users_are_not_paired(tmp_path: Path, capsys) -> None:
    from recbole_iisan.quick_start import results as report
    from recbole_iisan.evaluator import per_user

    for model, users in (("A", ["u1", "u2", "u3"]), ("B", ["u1", "u2", "u4"])):
        per_user.write(tmp_path / f"{model}-seed1.users.csv", users, {"hit@10": np.array([1.0, 0.0, 1.0])})
        (tmp_path / f"{model}-seed1.json").write_text(json.dumps({
            "model": model, "seed": 1, "valid_metric": "Hit@10", "metrics": ["Hit"], "topk": [10],
            "test_result": {"hit@10": 2 / 3}, "per_user_file": f"{model}-seed1.users.csv", "peak_memory": {}}))
    assert report.main([str(tmp_path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other test users" in err


def test_an_unfinished_comparison_renders_what_ran_and_names_what_did_not(tmp_path: Path, capsys) -> None:
    """Only the baseline has results (the others still running): its row, no paired test, and the
    models of comparison.json without a result named."""
    from recbole_iisan.quick_start import results as report
    from recbole_iisan.evaluator import per_user

    (tmp_path / "comparison.json").write_text(json.dumps({"models": ["A", "B", "C"], "protocol": "RecBole protocol"}))
    for seed, hit in ((1, [1.0, 0.0, 1.0]), (2, [1.0, 0.0, 0.0])):
        per_user.write(tmp_path / f"A-seed{seed}.users.csv", ["u1", "u2", "u3"], {"hit@10": np.array(hit)})
        (tmp_path / f"A-seed{seed}.json").write_text(json.dumps({
            "model": "A", "seed": seed, "valid_metric": "Hit@10", "metrics": ["Hit"], "topk": [10],
            "test_result": {"hit@10": sum(hit) / 3}, "per_user_file": f"A-seed{seed}.users.csv", "peak_memory": {}}))
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| A " in out and "0.5000 ± 0.2357" in out  # mean and sample std of 2/3 and 1/3
    assert "no paired test" in out and "No result yet for B, C" in out


def test_seeds_flag_errors_are_one_line(capsys) -> None:
    for bad in ("--seeds=1,x", "--seeds=1,1", "--seeds=,"):
        assert cli.main(["--model=SASRec", "--dataset=ml-100k", bad]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error: --seeds=") for e in err)
