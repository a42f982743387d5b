"""item_id_embedding: a learned ID embedding on top of the content embedding for items seen in
training; items never trained on (cold-start held-out items, new items) stay content only."""
from __future__ import annotations

from pathlib import Path

import torch


def _model(data: Path, tmp: Path, bert: str, **extra):
    from recbole.data import data_preparation

    from recbole_iisan.evaluator.cold_start import apply
    from recbole_iisan.config.configurator import build_config, get_model_class
    from recbole_iisan.data.utils import create_dataset, prepare_inputs

    cfg = build_config("IISANVS", "tiny", config_dict={
        "data_path": str(data), "cache_dir": str(tmp / "cache"), "towers": ["text", "text2"],
        "text_encoder": bert, "text2_encoder": bert, "text_fields": ["title"], "text2_fields": ["title"],
        "embedding_size": 16, "sanb_size": 8, "inner_size": 32, "cold_start_items": 0.25, **extra})
    cls = get_model_class("IISANVS")
    prepare_inputs(cfg, cls)
    ds = apply(cfg, create_dataset(cfg, cls))
    train, _, _ = data_preparation(cfg, ds)
    torch.manual_seed(0)
    return cls(cfg, train._dataset), train, ds


def test_id_embedding_only_for_items_seen_in_training(tiny_data: Path, tmp_path: Path) -> None:
    from test_encoders import make_tiny_bert

    bert = str(make_tiny_bert(tmp_path / "bert"))
    plain, _, _ = _model(tiny_data, tmp_path, bert, item_id_embedding=False)
    assert plain.id_embedding is None
    model, train, ds = _model(tiny_data, tmp_path, bert, item_id_embedding=True)
    held = torch.as_tensor(ds.cold_items)
    assert model.id_seen[held].sum() == 0 and model.id_seen[0] == 0
    seen = torch.nonzero(model.id_seen[:, 0]).squeeze(1)
    assert len(seen) > 0 and not torch.isin(seen, held).any()
    assert model.parameter_counts()["total"] == plain.parameter_counts()["total"] + model.n_items * 16
    # one training step: the ID rows of trained items move, the held-out items' rows get no gradient
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    batch = next(iter(train))
    loss = model.calculate_loss(batch)
    loss.backward()
    assert model.id_embedding.weight.grad[held].abs().sum() == 0
    assert model.id_embedding.weight.grad[seen].abs().sum() > 0
    opt.step()
    model.eval()
    with torch.no_grad():
        content = model.side(*model.states(torch.arange(model.n_items))).float()
        table = model.item_table()
    torch.testing.assert_close(table[held], content[held])  # content only
    torch.testing.assert_close(table[seen], content[seen] + model.id_embedding.weight[seen])
    assert not torch.allclose(table[seen], content[seen])


def test_default_is_on_under_recbole_protocol_and_off_under_the_papers(tiny_data: Path, tmp_path: Path) -> None:
    """``item_id_embedding: ~``: True under RecBole's protocol (results/scientific_item_id), False
    under ``--paper_protocol`` (the paper's content-only items); a value the user sets is kept."""
    from test_encoders import make_tiny_bert

    bert = str(make_tiny_bert(tmp_path / "bert"))
    on, _, _ = _model(tiny_data, tmp_path, bert)
    assert on.id_embedding is not None
    paper, _, _ = _model(tiny_data, tmp_path, bert, paper_protocol=True)
    assert paper.id_embedding is None
    kept, _, _ = _model(tiny_data, tmp_path, bert, paper_protocol=True, item_id_embedding=True)
    assert kept.id_embedding is not None
