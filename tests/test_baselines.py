"""End-to-end baselines (FFT, Adapter, LoRA, BitFit, IISANUncached) on tiny BERT / ViT backbones."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

import recbole_iisan  # noqa: F401  (compat shims)
from recbole.data import data_preparation
from recbole.utils import init_seed

from recbole_iisan.config.configurator import build_config, get_model_class
from recbole_iisan.data.dataset import MultimodalSequentialDataset
from recbole_iisan.data.raw_inputs import RawInputSequentialDataset
from recbole_iisan.evaluator.efficiency import tpme
from recbole_iisan.data.utils import create_dataset, prepare_inputs

from conftest import WORDS, write_tiny_dataset

N_ITEMS = 24


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTImageProcessor, ViTModel

    root = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    words = sorted(set(WORDS))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [str(i) for i in range(N_ITEMS)]
    bert_dir = root / "bert"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(bert_dir)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert_dir)
    vit_dir = root / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(vit_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, resample=2).save_pretrained(vit_dir)
    data = root / "data"
    write_tiny_dataset(data, n_users=30, n_items=N_ITEMS, seq_len=(5, 8))
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_ITEMS):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(imgs / f"i{i}.png")
    return {"root": root, "data": data, "bert": str(bert_dir), "vit": str(vit_dir), "imgs": str(imgs)}


def config_for(env, model: str, **kw):
    cfg = {
        "data_path": str(env["data"]),
        "checkpoint_dir": str(env["root"] / "saved"),
        "cache_dir": str(env["root"] / "cache"),
        "towers": ["text", "image"],
        "text_encoder": env["bert"],
        "text_fields": ["title"],
        "image_encoder": env["vit"],
        "image_dir": env["imgs"],
        "train_batch_size": 8,
        "eval_batch_size": 64,
        "epochs": 1,
        "use_gpu": False,
        "show_progress": False,
        "tower_batch_size": 10,
        "hidden_dropout_prob": 0.0,
        "attn_dropout_prob": 0.0,
        "cache_dtype": "float32",
    }
    cfg.update(kw)
    return build_config(model, "tiny", config_dict=cfg)


_DATA: dict = {}


def data_for(env, model: str, **kw):
    config = config_for(env, model, **kw)
    key = (get_model_class(model).item_inputs, tuple(sorted(kw.items())))
    prepare_inputs(config)
    if key not in _DATA:
        init_seed(config["seed"], True)
        ds = create_dataset(config, get_model_class(model))
        _DATA[key] = (ds, *data_preparation(config, ds))
    return config, _DATA[key]


def build(env, model: str, **kw):
    config, (ds, train, valid, test) = data_for(env, model, **kw)
    init_seed(2020, True)
    net = get_model_class(model)(config, train._dataset)
    return net, config, train, valid


def trainable_names(net) -> set[str]:
    return {n for n, p in net.named_parameters() if p.requires_grad}


HEAD_PREFIXES = ("proj_a.", "proj_b.", "fusion.", "position_embedding.", "trm_encoder.", "LayerNorm.")


def test_raw_inputs_dataset(env):
    config, (ds, *_rest) = data_for(env, "FFT")
    assert isinstance(ds, RawInputSequentialDataset)
    n = ds.item_num
    text, image = ds.item_inputs["text"], ds.item_inputs["image"]
    assert text["input_ids"].shape[0] == n and text["attention_mask"].shape == text["input_ids"].shape
    assert image["pixels"].shape == (n, 3, 32, 32) and image["pixels"].dtype == torch.uint8
    assert int(image["pixels"][0].sum()) == 0  # padding row: black
    # internal id order: the text of internal id k is the title of token field2id_token[k]
    tok = ds.field2id_token["item_id"][3]
    ids = text["input_ids"][3][text["attention_mask"][3].bool()].tolist()
    assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids  # [CLS] ... [SEP], no [UNK]
    assert ds_tokenizer_decode(env, ids).split()[-2] == tok[1:]  # the title ends with the item number


def ds_tokenizer_decode(env, ids):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(env["bert"]).decode(ids)


def test_fft_trains_everything(env):
    net, *_ = build(env, "FFT")
    names = trainable_names(net)
    backbone = {n for n, _ in net.named_parameters() if n.startswith("backbones.")}
    assert backbone and backbone <= names
    assert all(n.startswith(HEAD_PREFIXES) for n in names - backbone)
    assert not any("pooler" in n for n, _ in net.named_parameters())
    groups = {g["name"]: g["lr"] for g in net.param_groups()}
    assert groups == {"recsys": 1e-4, "text_backbone": 5e-5, "image_backbone": 1e-4}


def test_adapter_trains_only_adapters_heads_user_encoder(env):
    net, *_ = build(env, "Adapter")
    names = trainable_names(net)
    adapters = {n for n in names if n.startswith("backbones.")}
    assert adapters and all((".down." in n or ".up." in n) and ".adapter." in n for n in adapters)
    assert len(net._adapters) == 2 * 4 * 2  # 2 per layer, 4 layers, 2 backbones
    assert all(n.startswith(HEAD_PREFIXES) for n in names - adapters)
    per = 2 * 32 * 64 + 64 + 32
    assert net.parameter_counts()["adapters"] == 16 * per
    assert {g["name"] for g in net.param_groups()} == {"recsys", "peft"}


def test_lora_keeps_pretrained_weights_and_starts_as_the_backbone(env):
    from recbole_iisan.towers.encoders import load_backbone

    net, *_ = build(env, "LoRA")
    names = trainable_names(net)
    lora = {n for n in names if n.startswith("backbones.")}
    assert lora and all("lora_A" in n or "lora_B" in n for n in lora)
    assert all(n.startswith(HEAD_PREFIXES) for n in names - lora)
    # 2 backbones x 4 layers x (query, value) x (A + B)
    assert net.parameter_counts()["adapters"] == 2 * 4 * 2 * (8 * 32 + 32 * 8)
    net.eval()
    ids = torch.arange(1, net.n_items)
    for tower, enc in (("text", env["bert"]), ("image", env["vit"])):
        orig = load_backbone(enc, drop_pooler=True)
        orig.eval()
        sd = dict(net.backbones.models[tower].named_parameters())
        for n, p in orig.named_parameters():
            if n.endswith(("query.weight", "value.weight", "q_proj.weight", "v_proj.weight",
                           "query.bias", "value.bias", "q_proj.bias", "v_proj.bias")):
                base = n.rsplit(".", 1)
                lora_name = f"{base[0]}.base_layer.{base[1]}"
                assert torch.equal(sd[lora_name], p) and not sd[lora_name].requires_grad
        kwargs, mask = net.backbones.inputs(tower, ids)
        with torch.no_grad():
            a = net.backbones.models[tower](**kwargs).last_hidden_state
            b = orig(**kwargs).last_hidden_state
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # B = 0 at init


def test_bitfit_trains_only_backbone_biases(env):
    net, *_ = build(env, "BitFit")
    names = trainable_names(net)
    backbone = {n for n in names if n.startswith("backbones.")}
    assert backbone and all(n.endswith("bias") for n in backbone)
    all_biases = {n for n, _ in net.named_parameters() if n.startswith("backbones.") and n.endswith("bias")}
    assert backbone == all_biases
    assert all(n.startswith(HEAD_PREFIXES) for n in names - backbone)


def test_uncached_equals_cached_iisan(env):
    kw = {"head_type": "symmetric"}
    unc, _, _, _ = build(env, "IISANUncached", **kw)
    assert not any(p.requires_grad for p in unc.states.backbones.parameters())
    cconf, (cds, ctrain, *_r) = data_for(env, "IISANVS", **kw)
    assert isinstance(cds, MultimodalSequentialDataset)
    init_seed(2020, True)
    cached = get_model_class("IISANVS")(cconf, ctrain._dataset)
    assert unc.state_layers == cached.state_layers
    missing, unexpected = cached.load_state_dict(unc.state_dict(), strict=False)
    assert not missing, missing
    assert all(k.startswith("states.backbones.") for k in unexpected)
    assert unc.parameter_counts() == cached.parameter_counts()
    unc.eval(), cached.eval()
    ids = torch.arange(1, unc.n_items)
    with torch.no_grad():
        live_a, live_b = unc.states(ids)
        cached_a, cached_b = cached.states(ids)
        torch.testing.assert_close(live_a, cached_a, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(live_b, cached_b, rtol=1e-2, atol=1e-2)
        # the same side network on the same states gives the same embeddings, bit for bit
        torch.testing.assert_close(unc.side(cached_a, cached_b), cached.side(cached_a, cached_b), rtol=0, atol=0)
        a, b = unc.item_embeddings(ids), cached.item_embeddings(ids)
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("model,kw", [("FFT", {}), ("Adapter", {}), ("LoRA", {}), ("BitFit", {}),
                                      ("IISANUncached", {}), ("FFT", {"run_pads": True})])
def test_one_training_step_and_eval(env, model, kw):
    net, config, train, valid = build(env, model, **kw)
    net.train()
    opt = torch.optim.Adam(net.param_groups())
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    batch = next(iter(train))
    loss = net.calculate_loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = [n for n, p in net.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if not p.requires_grad)
    net.eval()
    inter, *_ = next(iter(valid))
    with torch.no_grad():
        scores = net.full_sort_predict(inter)
    assert scores.shape == (inter.length, net.n_items) and torch.isfinite(scores[:, 1:]).all()


def test_run_pads_gives_the_same_loss(env):
    net, config, train, _ = build(env, "IISANUncached")
    net.train()
    batch = next(iter(train))
    torch.manual_seed(0)
    a = net.calculate_loss(batch)
    net.run_pads = True
    torch.manual_seed(0)
    b = net.calculate_loss(batch)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tpme_hand_example():
    # t: 10, 20, 30 -> 0, .5, 1; p: 1, 1, 3 -> 0, 0, 1; m: 5, 10, 5 -> 0, 1, 0
    out = tpme([10, 20, 30], [1, 1, 3], [5, 10, 5])
    assert out == pytest.approx([0.0, 0.45 * 0.5 + 0.45, 0.45 + 0.1])
    assert tpme([1, 1], [2, 2], [3, 3]) == [0.0, 0.0]  # no spread: 0
