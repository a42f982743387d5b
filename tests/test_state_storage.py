"""state_storage: the dataset serves the same states from memory or from a memory-mapped file."""
from __future__ import annotations

import torch

import recbole_iisan  # noqa: F401  (compat shims)
from recbole_iisan.config.configurator import build_config
from recbole_iisan.data.cache import storage as state_store
from recbole_iisan.data.dataset import MultimodalSequentialDataset
from recbole_iisan.data.utils import prepare_inputs

from conftest import write_tiny_dataset
from test_encoders import make_tiny_bert


def test_memory_and_mmap_give_the_same_states_and_mmap_is_a_file_map(tmp_path):
    data = tmp_path / "data"
    write_tiny_dataset(data, "tiny")
    bert = make_tiny_bert(tmp_path / "bert")
    datasets = {}
    for storage in ("memory", "mmap"):
        cfg = build_config("IISANVS", "tiny", config_dict={
            "data_path": str(data), "cache_dir": str(tmp_path / "cache"), "towers": ["text", "text2"],
            "text_encoder": str(bert), "text2_encoder": str(bert), "text_fields": ["title"],
            "text2_fields": ["title"], "state_storage": storage})
        prepare_inputs(cfg)
        datasets[storage] = MultimodalSequentialDataset(cfg)
    mem, mm = datasets["memory"], datasets["mmap"]
    assert mem.state_storage == "memory" and mm.state_storage == "mmap"
    for t in mem.towers:
        assert torch.equal(mem.item_states[t], mm.item_states[t])
        assert not state_store.is_memory_mapped(mem.item_states[t])
        assert state_store.is_memory_mapped(mm.item_states[t])
        assert torch.count_nonzero(mm.item_states[t][0]) == 0  # row 0: the padding item
