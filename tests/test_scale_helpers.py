"""The two pieces that make a million items fit: the memory-mapped state store and the streaming
top-k full ranking. Both against the plain computation they replace."""
from __future__ import annotations

import random
import sys

import pytest
import torch

from recbole_iisan.data.cache import storage as state_store
from recbole_iisan.utils.errors import CacheError
from recbole_iisan.evaluator.ranking import streaming_topk, topk_hits


# ------------------------------------------------------------------------------ streaming top-k

@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_streaming_topk_equals_full_topk(chunk):
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(33, 8, generator=g), torch.randn(301, 8, generator=g)
    exclude = torch.randint(0, 301, (33, 5), generator=g)
    exclude[:, -1] = 0  # pads
    full = users @ items.t()
    full[:, 0] = float("-inf")
    full[torch.arange(33).unsqueeze(1).expand_as(exclude), exclude] = float("-inf")
    want_v, want_i = torch.topk(full, 10, dim=1)
    v, i = streaming_topk(users, items, 10, chunk_items=chunk, exclude=exclude)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(v, want_v)
    # the table may be computed chunk by chunk instead of held whole
    v2, i2 = streaming_topk(users, lambda s, e: items[s:e], 10, chunk_items=chunk, n_items=301, exclude=exclude)
    assert torch.equal(i2, want_i)


def test_topk_hits_match_recbole_collector_layout():
    topk = torch.tensor([[5, 3, 9], [1, 2, 4]])
    hits, pos_len = topk_hits(topk, torch.tensor([0, 0, 1]), torch.tensor([3, 7, 4]), n_items=10)
    assert hits.tolist() == [[0, 1, 0], [0, 0, 1]] and pos_len.tolist() == [[2], [1]]


def test_streaming_evaluation_equals_recbole_full_sort(tmp_path, monkeypatch):
    """RecBole's Trainer.evaluate on SASRec == evaluate_full_sort_streaming with small chunks."""
    from recbole.data import data_preparation

    from conftest import write_tiny_dataset
    from recbole_iisan.config.configurator import build_config, get_model_class
    from recbole_iisan.data.utils import create_dataset
    from recbole_iisan.trainer.trainer import PluginTrainer
    from recbole_iisan.evaluator.ranking import evaluate_full_sort_streaming

    write_tiny_dataset(tmp_path, "tiny", n_users=120, n_items=300, seed=1)
    monkeypatch.setattr(sys, "argv", ["x"])
    monkeypatch.chdir(tmp_path)
    config = build_config("SASRec", "tiny", config_dict={
        "data_path": str(tmp_path), "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1,
        "metrics": ["Hit", "NDCG", "MRR", "Recall"], "topk": [5, 10], "eval_batch_size": 50})
    ds = create_dataset(config, get_model_class("SASRec"))
    train, _, test = data_preparation(config, ds)
    trainer = PluginTrainer(config, get_model_class("SASRec")(config, train._dataset))
    trainer._train_epoch(train, 0)  # a trained (not random-init) model
    want = trainer.evaluate(test, load_best_model=False)
    got = evaluate_full_sort_streaming(trainer, test, chunk_items=37)
    assert dict(got) == dict(want)


# ------------------------------------------------------------------------------ state store

@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from test_encoders import make_tiny_bert

    from recbole_iisan.data.cache import ensure_cache
    from recbole_iisan.towers.spec import TowerSpec

    root = tmp_path_factory.mktemp("store")
    bert = make_tiny_bert(root / "bert")
    rng = random.Random(0)
    tokens = [f"i{k}" for k in range(50)]
    texts = [" ".join(rng.sample(["red", "blue", "flask", "tube", "glass", "scale", "lab", "set"], 3)) for _ in tokens]
    from conftest import plugin_defaults

    cfg = {**plugin_defaults(), "cache_dir": str(root / "cache"), "encoder_batch_size": 16, "cache_dtype": "float16",
           "data_path": str(root / "data"), "dataset": "toy"}
    folder = ensure_cache(cfg, TowerSpec("text", "text", str(bert), ("title",), 12), [0, 2, 4], tokens, texts)
    return folder, tokens


def test_dense_and_mmap_equal_load_states_padded(tiny_cache, tmp_path):
    from recbole_iisan.data.cache import load_states

    folder, tokens = tiny_cache
    order = tokens[::-1] + ["not-cached"]  # any id order; an absent token is reported
    ref, ref_missing = load_states(folder, order, [0, 4])
    dense, missing = state_store.load_item_states(folder, order, [0, 4], storage="memory")
    assert missing == ref_missing == [len(order) - 1]
    assert dense.shape == (len(order) + 1, 2, 32) and torch.count_nonzero(dense[0]) == 0
    assert torch.equal(dense[1:], ref)
    assert not state_store.is_memory_mapped(dense)

    mm, missing = state_store.load_item_states(folder, order, [0, 4], storage="mmap", folder=tmp_path)
    assert missing == ref_missing and state_store.is_memory_mapped(mm)
    assert torch.equal(mm, dense)
    ids = torch.tensor([[3, 1], [0, 50]])
    assert torch.equal(mm[ids], dense[ids])  # a batch gather reads the file's rows
    # the export is reused (not rewritten) and keyed by what it holds
    path = state_store.state_file(folder, order, [0, 4], torch.float16, tmp_path)
    stamp = path.stat().st_mtime_ns
    state_store.load_item_states(folder, order, [0, 4], storage="mmap", folder=tmp_path)
    assert path.stat().st_mtime_ns == stamp
    assert state_store.state_file(folder, order, [0, 2], torch.float16, tmp_path) != path
    assert state_store.state_file(folder, order[1:], [0, 4], torch.float16, tmp_path) != path
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


def test_bfloat16_mmap_and_refusals(tiny_cache, tmp_path):
    folder, tokens = tiny_cache
    dense, _ = state_store.load_item_states(folder, tokens, [2], dtype=torch.bfloat16)
    mm, _ = state_store.load_item_states(folder, tokens, [2], dtype=torch.bfloat16, storage="mmap", folder=tmp_path)
    assert mm.dtype == torch.bfloat16 and torch.equal(mm, dense)
    with pytest.raises(CacheError, match="stores hidden states"):
        state_store.load_item_states(folder, tokens, [1])
    with pytest.raises(CacheError, match="state_storage"):
        state_store.choose_storage("disk", 10)


def test_auto_storage_by_available_memory():
    assert state_store.choose_storage("auto", 4 * 2**30, available=16 * 2**30) == "memory"
    assert state_store.choose_storage("auto", 12 * 2**30, available=16 * 2**30) == "mmap"
    assert state_store.choose_storage("memory", 10**15) == "memory"
    assert state_store.available_memory_bytes() > 0
    # BERT-base shapes (7 rows x 768, float16), 1M items: 10.75 KB per item and tower
    assert state_store.state_bytes(10**6, 7, 768, torch.float16) == (10**6 + 1) * 10752
