"""ranking_chunk_items: the trainer's streaming top-k gives RecBole's metrics, history mask included."""
from __future__ import annotations

import json

import pytest
from recbole.data import data_preparation

import recbole_iisan  # noqa: F401  (compat shims)
from recbole_iisan.quick_start import cli
from recbole_iisan.config.configurator import build_config, get_model_class
from recbole_iisan.data.utils import create_dataset, prepare_inputs
from recbole_iisan.trainer.trainer import PluginTrainer

from conftest import write_tiny_dataset

FAST = ["--epochs=1", "--train_batch_size=64", "--hidden_size=16", "--inner_size=32", "--n_layers=1",
        "--n_heads=1", "--embedding_size=16"]


def _evaluate(data, checkpoint, **cd):
    config = build_config("SASRec", "rk", config_dict=dict(data_path=str(data), metrics=["Hit", "NDCG", "MRR"],
                                                            topk=[5, 10], hidden_size=16, inner_size=32, n_layers=1,
                                                            n_heads=1, embedding_size=16, **cd))
    prepare_inputs(config)
    _, valid, test = data_preparation(config, create_dataset(config, get_model_class("SASRec")))
    trainer = PluginTrainer(config, get_model_class("SASRec")(config, test._dataset))
    return (dict(trainer.evaluate(valid, load_best_model=True, model_file=checkpoint)),
            dict(trainer.evaluate(test, load_best_model=True, model_file=checkpoint)))


@pytest.mark.parametrize("mask_history", [False, True])
def test_streaming_topk_equals_recbole_full_ranking(tmp_path, mask_history):
    data = tmp_path / "data"
    write_tiny_dataset(data, "rk", n_users=80, n_items=50, seq_len=(5, 12))
    out = tmp_path / "r.json"
    assert cli.main(["--model=SASRec", "--dataset=rk", f"--data_path={data}", f"--result_file={out}",
                     f"--checkpoint_dir={tmp_path / 'ck'}", "--metrics=['Hit','NDCG','MRR']", "--topk=[5,10]",
                     *FAST]) == 0
    ckpt = json.loads(out.read_text())["checkpoint"]
    full = _evaluate(data, ckpt, mask_history=mask_history, ranking_chunk_items=0)
    streamed = _evaluate(data, ckpt, mask_history=mask_history, ranking_chunk_items=7)  # 7 items per chunk
    assert full == streamed
    assert set(full[1]) == {"hit@5", "hit@10", "ndcg@5", "ndcg@10", "mrr@5", "mrr@10"}
