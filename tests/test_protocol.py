"""The paper's protocol (iisan-method.md 1.3-1.8, 4.1, 5) and ``mask_history``, checked against
references written out here from the formulas, on a tiny hand-written dataset.

- the training windows: one per user, the train sequence s[0:L-2] of the 13-truncated sequence;
- the loss: the authors' in-batch softmax with log-popularity correction and the masking of the
  user's whole 11-slot window (section 4.1), with plain Python loops, on item embeddings and user
  outputs fixed by the test, against the plugin's ``calculate_loss``;
- the ranks: the user's full history (validation: s[0:L-2], test: s[0:L-1]) at -inf;
- ``mask_history`` for SASRec and IISAN alike; the selection defaults; the authors' user encoder;
- the fp16 cache refuses states beyond 65,504.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import WORDS

# hand-written sequences (time order). u3 is longer than 13 (truncated), u2's test target repeats
# an item of its training sequence, u4's validation target repeats, u5's test target repeats the
# validation item.
SEQS = {
    "u1": ["a", "b", "c", "d", "e"],
    "u2": ["b", "c", "a", "f", "g", "h", "b"],
    "u3": ["a", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "c"],
    "u4": ["c", "d", "e", "c", "f"],
    "u5": ["f", "g", "h", "i", "j", "k", "k"],
    "u6": ["e", "d", "c", "b", "a", "g"],
}
KEEP = 13  # MAX_ITEM_LIST_LENGTH + 3
T = 11  # slots per user (max_seq_len + 1)


def truncated(seq):
    return seq[-KEEP:]


def write_hand_dataset(root: Path, name: str = "hand") -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    t = 0
    for u, seq in SEQS.items():
        for it in seq:
            t += 1
            lines.append(f"{u}\t{it}\t{t}")
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    items = sorted({i for s in SEQS.values() for i in s})
    rows = ["item_id:token\ttitle:token_seq"] + [f"{it}\t{WORDS[k % len(WORDS)]} {WORDS[(3 * k + 1) % len(WORDS)]} {it}"
                                                 for k, it in enumerate(items)]
    (folder / f"{name}.item").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from test_encoders import make_tiny_bert

    root = tmp_path_factory.mktemp("protocol")
    write_hand_dataset(root / "data")
    return {"root": root, "data": root / "data", "bert": str(make_tiny_bert(root / "bert"))}


def _config(env, model: str, **extra):
    from recbole_iisan.config import build_config

    d = {"data_path": str(env["data"]), "checkpoint_dir": str(env["root"] / "ck"), "show_progress": False,
         "train_batch_size": 64, "eval_batch_size": 64, "embedding_size": 16, "inner_size": 32, "seed": 7}
    if model.startswith("IISAN"):
        d.update({"cache_dir": str(env["root"] / "cache"), "towers": ["text", "text2"], "text_fields": ["title"],
                  "text2_fields": ["title"], "text_encoder": env["bert"], "text2_encoder": env["bert"],
                  "sanb_size": 8, "cache_dtype": "float32", "encoder_batch_size": 8})
    else:
        d.pop("inner_size")
        d.update({"hidden_size": 16, "inner_size": 32})
    d.update(extra)
    return build_config(model, "hand", config_dict=d)


def _setup(env, model: str, **extra):
    """(config, dataset, (train, valid, test) loaders, model, trainer) through the plugin's own path."""
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_iisan.config import get_model_class
    from recbole_iisan.quick_start import create_dataset, prepare_inputs
    from recbole_iisan.trainer import PluginTrainer, apply_protocol_defaults

    cfg = _config(env, model, **extra)
    apply_protocol_defaults(cfg)
    init_seed(cfg["seed"], True)
    cls = get_model_class(model)
    prepare_inputs(cfg, cls)
    ds = create_dataset(cfg, cls)
    loaders = data_preparation(cfg, ds)
    init_seed(cfg["seed"], True)
    net = cls(cfg, loaders[0]._dataset)
    trainer = PluginTrainer(cfg, net)
    return cfg, ds, loaders, net, trainer


def _tok(ds, ids):
    return [str(ds.id2token(ds.iid_field, int(i))) for i in ids]


# ------------------------------------------------------------------------------------------- windows

def test_paper_protocol_trains_one_window_per_user_the_train_sequence(env) -> None:
    cfg, ds, (train, valid, test), net, trainer = _setup(env, "IISANVS", paper_protocol=True)
    feat = train._dataset.inter_feat
    assert len(train._dataset) == len(SEQS)  # one training sequence per user (train_samples)
    from recbole_iisan.model.loss import build_slots

    slots = build_slots(feat["item_id_list"], feat["item_length"], feat["item_id"])
    for r in range(len(feat)):
        user = str(ds.id2token(ds.uid_field, int(feat["user_id"][r])))
        s = truncated(SEQS[user])
        expected = s[: len(s) - 2]  # the authors' train sequence s[0:L-2]
        got = [t for t in _tok(ds, slots[r]) if t != "[PAD]"]
        assert got == expected, user
    # validation/test inputs: the up-to-10 items before the target
    for loader, back in ((valid, 2), (test, 1)):
        f = loader._dataset.inter_feat
        for r in range(len(f)):
            user = str(ds.id2token(ds.uid_field, int(f["user_id"][r])))
            s = truncated(SEQS[user])
            L = len(s)
            n = int(f["item_length"][r])
            assert _tok(ds, f["item_id_list"][r][:n]) == s[max(0, L - back - 10): L - back]
            assert _tok(ds, [f["item_id"][r]]) == [s[L - back]]
    # RecBole's protocol keeps its prefix augmentation (numbers of the default protocol unchanged)
    _, _, (train_rb, _, _), _, _ = _setup(env, "IISANVS")
    assert len(train_rb._dataset) == sum(len(s) - 3 for s in SEQS.values())


# ------------------------------------------------------------------------------------------- loss

def _reference_loss(windows: list[list[int]], E: np.ndarray, Q: np.ndarray, logp: dict[int, float]) -> float:
    """iisan-method.md 4.1 with plain loops. windows[b]: the 11 left-padded slot ids of user b;
    E[i]: item i's embedding; Q[b, j]: user b's output at input slot j (j = 0..9)."""
    B = len(windows)
    cols = [i for w in windows for i in w]  # N = B * 11 columns
    total, rows = 0.0, 0
    for b in range(B):
        for j in range(T - 1):
            if windows[b][j] == 0 or windows[b][j + 1] == 0:  # log_mask: input and target real
                continue
            pos = b * T + j + 1
            z = []
            for c, cid in enumerate(cols):
                v = float(np.dot(Q[b, j], E[cid])) - (logp[cid] if cid != 0 else 0.0)
                if cid == 0:
                    v = -1e4  # pad column
                if cid in windows[b] and c != pos:
                    v = -1e4  # the user's own items (and pads), except the positive
                z.append(v)
            m = max(z)
            lse = m + math.log(sum(math.exp(x - m) for x in z))
            total += lse - z[pos]
            rows += 1
    return total / rows


def test_loss_equals_the_authors_formula_on_fixed_embeddings(env) -> None:
    cfg, ds, (train, _, _), net, _ = _setup(env, "IISANVS", paper_protocol=True)
    assert net.loss_positions == "all"
    batch = next(iter(train))
    n_items = ds.item_num
    g = torch.Generator().manual_seed(0)
    E = torch.randn(n_items, 16, generator=g, dtype=torch.float64)
    users = [str(ds.id2token(ds.uid_field, int(u))) for u in batch["user_id"]]
    tok2id = {str(t): i for i, t in enumerate(ds.field2id_token[ds.iid_field])}
    windows = []
    for u in users:
        s = truncated(SEQS[u])
        train_seq = [tok2id[t] for t in s[: len(s) - 2]]
        windows.append([0] * (T - len(train_seq)) + train_seq)  # the authors' 11 left-padded slots
    Q = torch.randn(len(users), T - 1, 16, generator=g, dtype=torch.float64)
    # popularity (1.8): every occurrence in the train sequences s[0:L-2]; p[0] = 1
    counts = {}
    for u, s in SEQS.items():
        s = truncated(s)
        for t in s[: len(s) - 2]:
            counts[tok2id[t]] = counts.get(tok2id[t], 0) + 1
    tot = sum(counts.values())
    logp = {i: math.log(c / tot) for i, c in counts.items()}
    ref = _reference_loss(windows, E.numpy(), Q.numpy(), logp)

    # the plugin: the same item embeddings and user outputs, through calculate_loss
    item_seq, lens = batch["item_id_list"], batch["item_length"]
    L = item_seq.size(1)
    q_left = torch.zeros(len(users), L, 16, dtype=torch.float64)
    for b, u in enumerate(users):  # the output at the j-th item of the sequence = the authors' slot 11-n+j
        n = int(lens[b]) + 1
        for j in range(int(lens[b])):
            q_left[b, j] = Q[b, T - n + j]
    net.item_embeddings = lambda ids: E[ids]
    net.encode_sequence = lambda seq_emb, seq: q_left
    net.train()
    loss = net.calculate_loss(batch)
    assert abs(float(loss) - ref) < 1e-6, (float(loss), ref)
    for i, lp in logp.items():
        assert abs(float(net.log_pop[i]) - lp) < 1e-6


# ------------------------------------------------------------------------------------------- ranks

def _scores(trainer, loader, mask: bool):
    """(user tokens, target ids, scores [n, n_items]) of a full-sort loader, through the trainer."""
    trainer.model.eval()
    trainer._eval_dataset = loader._dataset
    trainer.tot_item_num = loader._dataset.item_num
    trainer.mask_history = mask
    users, targets, out = [], [], []
    with torch.no_grad():
        for batch in loader:
            inter, scores, _, pos_i = trainer._full_sort_batch_eval(batch)
            users += [str(loader._dataset.id2token(loader._dataset.uid_field, int(u))) for u in inter["user_id"]]
            targets.append(pos_i)
            out.append(scores.clone())
    return users, torch.cat(targets), torch.cat(out)


def _rank(scores: torch.Tensor, target: int) -> int:
    return 1 + int((scores > scores[target]).sum())


@pytest.mark.parametrize("model", ["IISANVS", "SASRec"])
def test_masked_ranks_equal_the_reference_and_mask_history_changes_only_what_it_should(env, model) -> None:
    cfg, ds, (_, valid, test), net, trainer = _setup(env, model, paper_protocol=True)
    assert cfg["mask_history"] is True and cfg["valid_metric"] == "Hit@10"
    tok2id = {str(t): i for i, t in enumerate(ds.field2id_token[ds.iid_field])}
    repeat_users = set()
    for loader, back in ((valid, 2), (test, 1)):
        users, targets, masked = _scores(trainer, loader, True)
        _, _, plain = _scores(trainer, loader, False)
        hits, ndcgs = [], []
        for r, u in enumerate(users):
            s = truncated(SEQS[u])
            history = {tok2id[t] for t in s[: len(s) - back]}  # validation: s[0:L-2]; test: s[0:L-1]
            target = int(targets[r])
            assert target == tok2id[s[len(s) - back]]
            ref = plain[r].clone()
            for h in history:  # the reference mask, one item at a time
                ref[h] = -math.inf
            assert torch.equal(masked[r], ref)  # exactly the history items, nothing else
            if target in history:
                repeat_users.add(u)
                assert masked[r, target] == -math.inf  # a repeat target can never be a hit
                hits.append(0.0)
                ndcgs.append(0.0)
                continue
            # a non-repeat target moves up by the number of history items that scored above it
            above = sum(1 for h in history if plain[r, h] > plain[r, target])
            rank = _rank(masked[r], target)
            assert rank == _rank(plain[r], target) - above
            hits.append(float(rank <= 10))
            ndcgs.append(1.0 / math.log2(rank + 1) if rank <= 10 else 0.0)
        # RecBole's evaluator on the masked scores gives the reference HR@10 / NDCG@10
        trainer.mask_history = True
        res = trainer.evaluate(loader, load_best_model=False)
        assert abs(res["hit@10"] - round(float(np.mean(hits)), 4)) < 1e-6
        assert abs(res["ndcg@10"] - round(float(np.mean(ndcgs)), 4)) < 1e-6
    assert repeat_users == {"u2", "u4", "u5"}


# ------------------------------------------------------------------------------------------- defaults

def test_protocol_defaults_and_explicit_choices(env) -> None:
    from recbole_iisan.trainer import apply_protocol_defaults

    cfg = _config(env, "SASRec")
    apply_protocol_defaults(cfg)
    assert cfg["mask_history"] is False and cfg["valid_metric"] == "NDCG@10"
    cfg = _config(env, "SASRec", paper_protocol=True)
    apply_protocol_defaults(cfg)
    assert cfg["mask_history"] is True and cfg["valid_metric"] == "Hit@10" and cfg["stopping_step"] == 10
    cfg = _config(env, "SASRec", paper_protocol=True, mask_history=False, valid_metric="NDCG@10")
    apply_protocol_defaults(cfg)
    assert cfg["mask_history"] is False and cfg["valid_metric"] == "NDCG@10"
    cfg = _config(env, "SASRec", mask_history=True)
    apply_protocol_defaults(cfg)
    assert cfg["mask_history"] is True and cfg["valid_metric"] == "NDCG@10"


def test_result_json_records_the_protocol(env, tmp_path: Path) -> None:
    import json

    from recbole_iisan import cli

    out = tmp_path / "r.json"
    code = cli.main(["--model=SASRec", "--dataset=hand", f"--data_path={env['data']}", f"--result_file={out}",
                     f"--checkpoint_dir={tmp_path}", "--epochs=1", "--hidden_size=16", "--inner_size=32",
                     "--paper_protocol"])
    assert code == 0
    r = json.loads(out.read_text())
    assert (r["protocol"], r["mask_history"], r["selection_metric"], r["train_samples"]) == ("paper", True, "Hit@10", 6)


# ------------------------------------------------------------------------------------------- user encoder

def test_authors_user_encoder(env) -> None:
    cfg, ds, (train, _, _), net, _ = _setup(env, "IISANVS", paper_protocol=True)
    assert net.user_encoder == "authors"
    for blk in net.trm_encoder.blocks:
        for k in ("q", "k", "v", "o"):
            assert blk[k].bias is None
        assert blk["ffn_in"].bias.abs().sum() == 0 and blk["attn_norm"].eps == 1e-6
    net.eval()
    torch.manual_seed(0)
    L = net.max_seq_length
    emb = torch.randn(3, L, 16)
    item_seq = torch.zeros(3, L, dtype=torch.long)
    lens = [L, 4, 1]
    for b, n in enumerate(lens):
        item_seq[b, :n] = torch.arange(1, n + 1)
    out = net.encode_sequence(emb, item_seq)
    # left-aligned outputs; pads give zeros; the last item does not depend on what follows it
    assert out[1, 4:].abs().sum() == 0
    emb2 = emb.clone()
    emb2[1, 4:] = 100.0
    torch.testing.assert_close(net.encode_sequence(emb2, item_seq)[1, :4], out[1, :4])
    # absolute right-aligned positions: the most recent item is always at position L-1
    with torch.no_grad():
        net.position_embedding.weight[0] += 3 * torch.randn(16)  # position 0 is only used by a full-length sequence
    out_p0 = net.encode_sequence(emb, item_seq)
    assert not torch.allclose(out_p0[0, L - 1], out[0, L - 1])
    torch.testing.assert_close(out_p0[1:], out[1:])
    with torch.no_grad():
        net.position_embedding.weight[L - 1] += 3 * torch.randn(16)  # every sequence's last item
    out_pl = net.encode_sequence(emb, item_seq)
    for b, n in enumerate(lens):
        assert not torch.allclose(out_pl[b, n - 1], out_p0[b, n - 1])
    # RecBole's protocol keeps RecBole's encoder
    _, _, _, net_rb, _ = _setup(env, "IISANVS")
    assert net_rb.user_encoder == "recbole"
    assert type(net_rb.trm_encoder).__module__.startswith("recbole.")


# ------------------------------------------------------------------------------------------- cache

def test_fp16_cache_refuses_states_beyond_65504(env, tmp_path: Path) -> None:
    from transformers import BertModel

    from recbole_iisan.errors import CacheError
    from recbole_iisan.quick_start import prepare_inputs

    big = tmp_path / "bigbert"
    m = BertModel.from_pretrained(env["bert"])
    with torch.no_grad():
        m.embeddings.LayerNorm.weight.mul_(1e6)  # hidden state 0 reaches ~1e6
    m.save_pretrained(big)
    for f in Path(env["bert"]).glob("*"):
        if "token" in f.name or f.name == "vocab.txt" or f.name.startswith("special"):
            (big / f.name).write_bytes(f.read_bytes())
    cfg = _config(env, "IISANVS", text_encoder=str(big), text2_encoder=str(big), cache_dtype="float16",
                  cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CacheError) as err:
        prepare_inputs(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "tower 'text'" in msg and "cache_dtype" in msg and "bfloat16" in msg
    peak = float(msg.split("|h| = ")[1].split(",")[0])
    assert peak > 65504
    # bfloat16 holds them
    cfg = _config(env, "IISANVS", text_encoder=str(big), text2_encoder=str(big), cache_dtype="bfloat16",
                  cache_dir=str(tmp_path / "cache"))
    assert set(prepare_inputs(cfg)) == {"text", "text2"}
