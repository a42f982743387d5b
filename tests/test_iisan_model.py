"""IISANVS / IISANVA on a tiny RecBole sequential dataset with random cached states."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import recbole_iisan  # noqa: F401  (compat shims)
from recbole.config import Config
from recbole.data import data_preparation
from recbole_iisan.data.dataset import ProtocolSequentialDataset
from recbole.utils import init_seed

from recbole_iisan.model.iisan import IISANBase, IISANVA, IISANVS
from recbole_iisan.config.configurator import build_config
from recbole_iisan.trainer.trainer import PluginTrainer

PROPS = Path(__file__).resolve().parents[1] / "properties"
N_USERS, N_ITEMS_RAW = 40, 30

# the paper's numbers (IISAN, arXiv:2404.02059, the trainable-parameter counts of Sec. 4): side networks + heads + fusion
VS_SIDE = 4_013_653  # 4,113,877 with the authors' 100,224-parameter user encoder
REF_USER_ENCODER = 100_224
RECBOLE_USER_ENCODER = REF_USER_ENCODER + 2 * 4 * 64  # RecBole's TransformerEncoder has Q/K/V/O biases


def _write_tiny(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "tiny").mkdir(parents=True, exist_ok=True)
    with open(root / "tiny" / "tiny.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in range(N_USERS):
            items = rng.integers(0, N_ITEMS_RAW, size=int(rng.integers(5, 10)))
            for t, i in enumerate(items):  # repeats occur
                f.write(f"u{u}\ti{i}\t{t}\n")


def make_config(tmp_root: Path, model_cls=IISANVS, **overrides) -> Config:
    cfg = {
        "data_path": str(tmp_root),
        "checkpoint_dir": str(tmp_root / "saved"),
        "train_batch_size": 16,
        "eval_batch_size": 64,
        "epochs": 1,
        "use_gpu": False,
        "show_progress": False,
        "tower_batch_size": 7,  # several chunks even on a tiny item set
    }
    cfg.update(overrides)
    return build_config(model_cls.__name__, "tiny", config_dict=cfg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _write_tiny(root)
    config = make_config(root)
    init_seed(config["seed"], True)
    ds = ProtocolSequentialDataset(config)  # the plugin's: it holds the users' histories (mask_history)
    attach_states(ds)
    train, valid, test = data_preparation(config, ds)
    return {"root": root, "dataset": ds, "train": train, "valid": valid, "test": test}


def attach_states(ds, dims=(32, 32), rows=(7, 7), depths=(12, 12), towers=("text", "image"), seed=0):
    """What MultimodalSequentialDataset provides: per-tower [n_items, n_rows, dim] fp16, row 0 zeros."""
    g = torch.Generator().manual_seed(seed)
    n = ds.num("item_id")
    ds.towers = list(towers)
    ds.item_states, ds.item_state_layers, ds.encoder_depths = {}, {}, {}
    for t, dim, k, depth in zip(towers, dims, rows, depths):
        s = torch.randn(n, k, dim, generator=g).half()
        s[0] = 0
        ds.item_states[t] = s
        ds.item_state_layers[t] = list(range(k))
        ds.encoder_depths[t] = depth


def build(tiny, model_cls=IISANVS, dims=(32, 32), rows=(7, 7), depths=(12, 12), **overrides):
    ds = tiny["train"]._dataset
    attach_states(ds, dims, rows, depths)
    config = make_config(tiny["root"], model_cls, **overrides)
    init_seed(2020, True)
    return model_cls(config, ds), config


def batch(tiny, which="train"):
    return next(iter(tiny[which]))


def eval_batch(tiny):
    interaction, _, _, _ = next(iter(tiny["valid"]))
    return interaction


# ---------------------------------------------------------------------------- parameter counts
def test_vs_parameter_count_is_the_papers(tiny):
    # the paper's content-only items (the default under RecBole's protocol adds an ID table)
    model, _ = build(tiny, IISANVS, dims=(768, 768), rows=(7, 7), depths=(12, 12), item_id_embedding=False)
    counts = model.parameter_counts()
    assert counts["side network"] == VS_SIDE
    assert counts["side network"] + REF_USER_ENCODER == 4_113_877
    assert counts["text tower"] == counts["image tower"] == 7 * 99_136 + 7
    assert counts["inter tower"] == 7 * 99_136 + 7
    assert counts["heads"] == 3 * (768 * 768 + 768 + 768 * 64 + 64)
    assert counts["fusion"] == 3 * 64 * 64 + 64
    assert counts["user encoder"] == RECBOLE_USER_ENCODER
    assert counts["total"] == VS_SIDE + RECBOLE_USER_ENCODER
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_va_parameter_count_bert_large_vit_base(tiny):
    model, _ = build(tiny, IISANVA, dims=(1024, 768), rows=(7, 7), depths=(24, 12))
    counts = model.parameter_counts()
    dtl = sum(p.numel() for p in model.side.inter.dtls.parameters())
    assert dtl == 7 * (1024 * 768 + 768) == 5_510_400
    total_ref = counts["side network"] + REF_USER_ENCODER
    assert total_ref == 8_698_965  # "about 8.70M"
    assert abs(total_ref - 8.70e6) < 0.01e6


def test_vs_rejects_unequal_towers(tiny):
    with pytest.raises(ValueError, match="IISANVA"):
        build(tiny, IISANVS, dims=(48, 32))
    with pytest.raises(ValueError, match="IISANVA"):
        build(tiny, IISANVS, depths=(24, 12))


def test_va_unequal_rows_and_widths_run(tiny):
    model, _ = build(tiny, IISANVA, dims=(48, 32), rows=(9, 5), depths=(24, 12))
    assert model.side.inter.n_steps == 5 and model.side.inter.dtl_side == "a"
    loss = model.calculate_loss(batch(tiny))
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------- behaviour
def test_gates_start_at_one_half(tiny):
    model, _ = build(tiny)
    gates = model.gate_values()
    assert set(gates) == {"text", "image", "inter"}
    assert all(v == [0.5] * 7 for v in gates.values())


def test_state_dict_holds_no_item_states(tiny, tmp_path):
    model, config = build(tiny)
    sd = model.state_dict()
    assert not any("states" in k or "log_pop" in k for k in sd)
    trainable = {n for n, p in model.named_parameters()}
    assert set(sd) == trainable  # parameters only (no persistent buffers in this model)
    buffers = dict(model.named_buffers())
    assert buffers["states.states_a"] is tiny["train"]._dataset.item_states["text"]  # shared, not copied
    # a checkpoint round trip gives the same scores
    torch.save(sd, tmp_path / "m.pth")
    other, _ = build(tiny)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    other.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))
    model.eval(), other.eval()
    inter = eval_batch(tiny)
    assert torch.allclose(model.full_sort_predict(inter), other.full_sort_predict(inter))


def test_unique_items_equal_per_slot_execution(tiny):
    model, _ = build(tiny)
    model.eval()  # no dropout in the user encoder
    inter = batch(tiny)
    seq = inter["item_id_list"]
    with torch.no_grad():
        per_slot = model.item_embeddings(seq.reshape(-1)).view(*seq.shape, -1)
        unique = model.embed_ids(seq)
    assert torch.allclose(per_slot, unique, atol=1e-6)
    # the whole loss: unique-item path (calculate_loss) vs every slot through the towers
    from recbole_iisan.model.loss import build_slots, inbatch_softmax_loss

    lens, pos = inter["item_length"], inter["item_id"]
    with torch.no_grad():
        slots = build_slots(seq, lens, pos)
        slot_emb = model.item_embeddings(slots.reshape(-1)).view(*slots.shape, -1)
        out = model.encode_sequence(model.item_embeddings(seq.reshape(-1)).view(*seq.shape, -1), seq)
        want = inbatch_softmax_loss(model.gather_indexes(out, lens - 1), slot_emb, slots, lens, model.log_pop)
        got = model.calculate_loss(inter)
    assert torch.allclose(got, want, atol=1e-5)


def test_full_sort_predict_equals_predict(tiny):
    # no dropout, so that the training-mode path (towers once per distinct id) is deterministic
    model, _ = build(tiny, hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    inter = eval_batch(tiny)
    B = len(inter)
    rep = inter.repeat_interleave(model.n_items)
    rep.update(type(inter)({"item_id": torch.arange(model.n_items).repeat(B)}))
    with torch.no_grad():
        model.eval()
        scores = model.full_sort_predict(inter)  # cached item table
        table_predict = model.predict(rep).view(B, model.n_items)
        model.train()
        unique_predict = model.predict(rep).view(B, model.n_items)  # no table: unique-id towers
    assert scores.shape == (B, model.n_items)
    assert torch.allclose(scores, table_predict, atol=1e-5)
    assert torch.allclose(scores, unique_predict, atol=1e-5)


def test_item_table_computed_once_per_evaluation_pass(tiny):
    model, _ = build(tiny)
    calls = []
    orig = model.compute_item_table

    def counting():
        calls.append(1)
        return orig()

    model.compute_item_table = counting
    inter = eval_batch(tiny)
    model.eval()
    with torch.no_grad():
        a = model.full_sort_predict(inter)
        model.full_sort_predict(inter)
    assert len(calls) == 1
    model.train()
    model.eval()
    with torch.no_grad():
        model.full_sort_predict(inter)
    assert len(calls) == 2  # train() invalidates
    # a parameter change while in eval mode (an optimizer step, a checkpoint load) invalidates too
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model.calculate_loss(batch(tiny)).backward()
    model.eval()
    with torch.no_grad():
        model.full_sort_predict(inter)
    n = len(calls)
    opt.step()
    with torch.no_grad():
        b = model.full_sort_predict(inter)
    assert len(calls) == n + 1 and not torch.allclose(a, b)


def test_history_is_masked_in_one_place_the_trainer(tiny):
    """The model scores every item; the trainer (one place, every model) masks the history."""
    model, config = build(tiny, paper_protocol=True)
    model.eval()
    inter = eval_batch(tiny)
    with torch.no_grad():
        raw = model.full_sort_predict(inter)
        assert torch.isfinite(raw).all()
        trainer = PluginTrainer(config, model)
        trainer.tot_item_num = tiny["valid"]._dataset.item_num
        trainer._eval_dataset = tiny["valid"]._dataset  # what evaluate() sets: the users' histories
        _, masked, _, _ = trainer._full_sort_batch_eval(next(iter(tiny["valid"])))
    seq = inter["item_id_list"]
    assert torch.isinf(masked.gather(1, seq)).all()


def test_cpu_runs_fp32_whatever_mixed_precision(tiny):
    model, _ = build(tiny, mixed_precision="bf16")
    inter = batch(tiny)
    out = model(inter["item_id_list"], inter["item_length"])
    assert out.dtype == torch.float32 and out.shape == (len(inter), 64)


ABLATIONS = [
    dict(modality=m, fusion=f) for m, f in itertools.product(["intra_inter", "intra", "inter"], ["gated", "add"])
] + [
    dict(loss_positions="all"),
    dict(loss_type="CE"),
    dict(loss_type="CE", loss_positions="all"),
    dict(sanb_activation="gelu", inter_sanb_size=16),
    dict(user_encoder_init="xavier"),
]


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_ablations_forward_backward(tiny, overrides):
    model, _ = build(tiny, **overrides)
    loss = model.calculate_loss(batch(tiny))
    loss.backward()
    assert torch.isfinite(loss)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.full_sort_predict(eval_batch(tiny))).all()


@pytest.mark.parametrize("model_cls", [IISANVS, IISANVA])
def test_frozen_backbone_and_no_layerdrop(tiny, model_cls):
    # frozen backbone: the dataset gives the last hidden state only
    model, _ = build(tiny, model_cls, rows=(1, 1), frozen_backbone=True)
    assert model.side.intra_a is None and model.side.inter is None
    counts = model.parameter_counts()
    assert counts["text tower"] == counts["image tower"] == counts["inter tower"] == 0
    model.calculate_loss(batch(tiny)).backward()
    # w/o LayerDrop: 13 rows per 12-layer tower
    model, _ = build(tiny, model_cls, rows=(13, 13), layerdrop=False)
    assert len(model.side.intra_a.blocks) == 13
    model.calculate_loss(batch(tiny)).backward()


@pytest.mark.parametrize("overrides", [{}, dict(modality="intra"), dict(modality="inter"), dict(frozen_backbone=True)])
@pytest.mark.parametrize("model_cls", [IISANVS, IISANVA])
def test_param_groups_cover_every_parameter_once(tiny, model_cls, overrides):
    rows = (1, 1) if overrides.get("frozen_backbone") else (7, 7)
    dims = (48, 32) if model_cls is IISANVA else (32, 32)
    model, _ = build(tiny, model_cls, dims=dims, rows=rows, **overrides)
    groups = model.param_groups()
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}
    lrs = {g["name"]: g["lr"] for g in groups}
    want = {"recsys": 2e-4, "text_sanb": 1e-4, "image_sanb": 1e-4, "image_head": 1e-4, "text_head": 5e-5}
    assert all(lrs[k] == want[k] for k in lrs)
    names = {id(p): n for n, p in model.named_parameters()}
    members = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    if not overrides:
        assert all(n.startswith("side.intra_a.blocks") for n in members["text_sanb"])
        assert {n.split(".")[1] for n in members["image_sanb"]} == {"intra_b", "inter"}
        assert members["image_head"] == {"side.head_b.first.weight", "side.head_b.first.bias", "side.intra_b.gates.theta"}
        assert members["text_head"] == {"side.head_a.first.weight", "side.head_a.first.bias"}
        assert {"side.intra_a.gates.theta", "side.inter.gates.theta", "side.fusion.weight"} <= members["recsys"]
        if model_cls is IISANVA:
            assert any(n.startswith("side.inter.dtls") for n in members["recsys"])


def test_iisan_lr_from_config(tiny):
    model, _ = build(tiny, iisan_lr={"text_head": 1e-3}, learning_rate=3e-4)
    lrs = {g["name"]: g["lr"] for g in model.param_groups()}
    assert lrs["text_head"] == 1e-3 and lrs["recsys"] == 3e-4 and lrs["text_sanb"] == 1e-4
    with pytest.raises(ValueError, match="iisan_lr"):
        build(tiny, iisan_lr={"bogus": 1.0})
    with pytest.raises(ValueError, match="modality"):
        build(tiny, modality="both")


def test_one_epoch_fit_with_iisan_trainer(tiny):
    model, config = build(tiny)
    assert IISANBase.item_inputs == "states"
    trainer = PluginTrainer(config, model)
    assert [g["name"] for g in trainer.optimizer.param_groups] == [
        "recsys", "text_sanb", "image_sanb", "image_head", "text_head"
    ]
    before = model.side.fusion.weight.detach().clone()
    best_score, best_result = trainer.fit(tiny["train"], tiny["valid"], saved=True, show_progress=False)
    assert not torch.equal(before, model.side.fusion.weight)
    assert "ndcg@10" in best_result
    result = trainer.evaluate(tiny["test"], load_best_model=True, show_progress=False)
    assert 0.0 <= result["hit@10"] <= 1.0
    assert os.path.isfile(trainer.saved_model_file)
    from safetensors.torch import load_file

    names = list(load_file(trainer.saved_model_file))  # the checkpoint's tensors, by safetensors alone
    assert any(k.startswith("state_dict/") for k in names)
    assert not any("states" in k for k in names)
