"""The paper's protocol (the authors' code, github.com/GAIR-Lab/IISAN; IISAN-Versa, arXiv:2411.02992,
Sec. V-A, Eqs. (6)-(7)) and ``mask_history``, checked against
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

from conftest import WORDS, write_atomic_files

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
    items = sorted({i for s in SEQS.values() for i in s})
    write_atomic_files(root, name, SEQS, {it: {"title": f"{WORDS[k % len(WORDS)]} {WORDS[(3 * k + 1) % len(WORDS)]} {it}"}
                                          for k, it in enumerate(items)})
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from test_encoders import make_tiny_bert

    root = tmp_path_factory.mktemp("protocol")
    write_hand_dataset(root / "data")
    return {"root": root, "data": root / "data", "bert": str(make_tiny_bert(root / "bert"))}


def _config(env, model: str, **extra):
    from recbole_iisan.config.configurator import build_config

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

    from recbole_iisan.config.configurator import get_model_class
    from recbole_iisan.data.utils import create_dataset, prepare_inputs
    from recbole_iisan.trainer.trainer import PluginTrainer

    cfg = _config(env, model, **extra)
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


def _triples(net, loader, ds) -> list[tuple[str, int, str]]:
    """The (user, position in the user's sequence, target) triples one training epoch supervises:
    every position of each window for a model whose loss reads every position, else the last
    position of each training row (RecBole's SASRec / GRU4Rec)."""
    out = []
    for batch in loader:
        seqs, lens, targets = batch["item_id_list"], batch["item_length"], batch["item_id"]
        for r in range(len(lens)):
            user = str(ds.id2token(ds.uid_field, int(batch["user_id"][r])))
            n = int(lens[r])
            window = [int(i) for i in seqs[r][:n]] + [int(targets[r])]
            positions = range(1, n + 1) if getattr(net, "loss_positions", "last") == "all" else [n]
            out += [(user, j, _tok(ds, [window[j]])[0]) for j in positions]
    return sorted(out)


def test_every_model_trains_on_the_same_user_position_target_triples_under_the_paper_protocol(env) -> None:
    from recbole_iisan.quick_start.pipeline import count_train_targets

    # by hand: each user's train sequence s[0:L-2] of the 13-truncated sequence; every position
    # j >= 1 of it is a target predicted from s[0:j]
    expected = sorted((u, j, truncated(s)[j]) for u, s in SEQS.items() for j in range(1, len(truncated(s)) - 2))
    assert len(expected) == 25  # 2 + 4 + 10 + 2 + 4 + 3
    for model in ("SASRec", "GRU4Rec", "IISANVS"):
        cfg, ds, (train, _, _), net, _ = _setup(env, model, paper_protocol=True)
        assert _triples(net, train, ds) == expected, model
        assert count_train_targets(net, train._dataset) == 25, model
    # IISAN: one window per user (the authors' layout); RecBole's models: the prefixes of the same window
    assert len(train._dataset) == len(SEQS)


# ------------------------------------------------------------------------------------------- loss

def _reference_loss(windows: list[list[int]], E: np.ndarray, Q: np.ndarray, logp: dict[int, float]) -> float:
    """The authors' loss (IISAN-Versa Eqs. (6)-(7), their code's masking) with plain loops. windows[b]: the 11 left-padded slot ids of user b;
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
                hits.append(0.0)  # a repeat target can never be a hit
                ndcgs.append(0.0)
                continue
            # the rank, independently: sort the unmasked scores of the candidates (every real item
            # not in the history; 15 items, more than the cut-off 10) and find the target
            cands = [i for i in range(1, ds.item_num) if i not in history]
            order = sorted(cands, key=lambda i: -float(plain[r, i]))
            rank = 1 + sum(1 for i in order if float(plain[r, i]) > float(plain[r, target]))
            assert order.index(target) + 1 >= rank  # ties broken either way
            hits.append(float(rank <= 10))
            ndcgs.append(1.0 / math.log2(rank + 1) if rank <= 10 else 0.0)
        assert ds.item_num - 1 == 15 and 0 < sum(hits) < len(hits)  # the cut-off matters here
        # RecBole's evaluator on the masked scores gives the reference HR@10 / NDCG@10
        trainer.mask_history = True
        res = trainer.evaluate(loader, load_best_model=False)
        assert abs(res["hit@10"] - round(float(np.mean(hits)), 4)) < 1e-6
        assert abs(res["ndcg@10"] - round(float(np.mean(ndcgs)), 4)) < 1e-6
    assert repeat_users == {"u2", "u4", "u5"}


# ------------------------------------------------------------------------------------------- defaults

def test_protocol_defaults_and_explicit_choices(env) -> None:
    cfg = _config(env, "SASRec")
    assert (cfg["mask_history"], cfg["valid_metric"], cfg["selection_rule"], cfg["train_batch_size"]) == \
        (False, "NDCG@10", "recbole", 64)  # 64: the test's own config_dict
    cfg = build_config_plain(env, "SASRec", paper_protocol=True)
    assert (cfg["mask_history"], cfg["valid_metric"], cfg["stopping_step"], cfg["selection_rule"],
            cfg["train_batch_size"]) == (True, "Hit@10", 10, "authors", 64)
    assert build_config_plain(env, "SASRec")["train_batch_size"] == 512  # RecBole's protocol: the yaml's
    cfg = _config(env, "SASRec", paper_protocol=True, mask_history=False, valid_metric="NDCG@10",
                  selection_rule="recbole", train_batch_size=128)
    assert (cfg["mask_history"], cfg["valid_metric"], cfg["selection_rule"], cfg["train_batch_size"]) == \
        (False, "NDCG@10", "recbole", 128)
    cfg = _config(env, "SASRec", mask_history=True)
    assert cfg["mask_history"] is True and cfg["valid_metric"] == "NDCG@10"
    cfg = build_config_plain(env, "IISANVS", paper_protocol=True)
    assert (cfg["loss_positions"], cfg["user_encoder"], cfg["train_batch_size"]) == ("all", "authors", 64)
    cfg = build_config_plain(env, "IISANVS")
    assert (cfg["loss_positions"], cfg["user_encoder"], cfg["train_batch_size"]) == ("last", "recbole", 512)


def build_config_plain(env, model: str, **extra):
    """A config with only the data path (and the towers of IISAN) set: the yaml's defaults."""
    from recbole_iisan.config.configurator import build_config

    d = {"data_path": str(env["data"])}
    if model.startswith("IISAN"):
        d.update({"towers": ["text", "text2"], "text_encoder": env["bert"], "text2_encoder": env["bert"],
                  "text_fields": ["title"], "text2_fields": ["title"]})
    d.update(extra)
    return build_config(model, "hand", config_dict=d)


def test_result_json_records_the_protocol(env, tmp_path: Path) -> None:
    import json

    from recbole_iisan.quick_start import cli

    out = tmp_path / "r.json"
    code = cli.main(["--model=SASRec", "--dataset=hand", f"--data_path={env['data']}", f"--result_file={out}",
                     f"--checkpoint_dir={tmp_path}", "--epochs=1", "--hidden_size=16", "--inner_size=32",
                     "--paper_protocol"])
    assert code == 0
    r = json.loads(out.read_text())
    assert (r["protocol"], r["mask_history"], r["selection_metric"], r["selection_rule"]) == \
        ("paper", True, "Hit@10", "authors")
    # SASRec: RecBole's prefixes of each user's window, one loss target each (25, see above)
    assert (r["train_samples"], r["train_targets"], r["train_batch_size"]) == (25, 25, 64)


# ------------------------------------------------------------------------------------------- user encoder

def _authors_encoder_reference(net, window_emb: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The authors' user encoder written out from their code (SASRec blocks: post-LN, Q/K/V/O without
    biases, ReLU FFN, causal + key-padding mask filled with -1e9, learned absolute positions on
    right-aligned windows), in float64 with explicit loops over users and heads, from the model's
    weights. ``window_emb [B, S, d]`` right-aligned, ``real [B, S]`` -> ``[B, S, d]``."""
    def lin(layer, x):
        y = x @ layer.weight.double().t()
        return y + layer.bias.double() if layer.bias is not None else y

    def norm(layer, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + layer.eps) * layer.weight.double() + layer.bias.double()

    B, S, d = window_emb.shape
    heads = net.trm_encoder.n_heads
    dk = d // heads
    x = norm(net.LayerNorm, window_emb.double() + net.position_embedding.weight[:S].double())
    for blk in net.trm_encoder.blocks:
        q, k, v = lin(blk["q"], x), lin(blk["k"], x), lin(blk["v"], x)
        ctx = torch.zeros_like(x)
        for b in range(B):
            for h in range(heads):
                sl = slice(h * dk, (h + 1) * dk)
                att = q[b, :, sl] @ k[b, :, sl].t() / math.sqrt(dk)
                for i in range(S):
                    for j in range(S):
                        if j > i or not real[b, j]:
                            att[i, j] = -1e9
                ctx[b, :, sl] = torch.softmax(att, dim=-1) @ v[b, :, sl]
        x = norm(blk["attn_norm"], x + lin(blk["o"], ctx))
        x = norm(blk["ffn_norm"], x + lin(blk["ffn_out"], torch.relu(lin(blk["ffn_in"], x))))
    return x


def test_authors_user_encoder_equals_the_reference_written_from_their_code(env) -> None:
    cfg, ds, (train, _, _), net, _ = _setup(env, "IISANVS", paper_protocol=True)
    assert net.user_encoder == "authors"
    net.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial biases and norms, so that every term of the block counts
        for p in net.trm_encoder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        net.position_embedding.weight.add_(torch.randn(net.position_embedding.weight.shape, generator=g))
    L = net.max_seq_length
    lens = [L, 4, 1]
    emb = torch.randn(len(lens), L, 16, generator=g)
    item_seq = torch.zeros(len(lens), L, dtype=torch.long)
    for b, n in enumerate(lens):
        item_seq[b, :n] = torch.arange(1, n + 1)
    with torch.no_grad():
        out = net.encode_sequence(emb, item_seq)  # left-aligned
        last = net.encode_last(emb, item_seq, torch.tensor(lens))  # evaluation: only the last position
    for b, n in enumerate(lens):
        window = torch.zeros(1, L, 16)
        window[0, L - n:] = emb[b, :n]  # the authors' right-aligned (left-padded) window
        real = torch.zeros(1, L, dtype=torch.bool)
        real[0, L - n:] = True
        ref = _authors_encoder_reference(net, window, real)[0, L - n:]
        torch.testing.assert_close(out[b, :n].double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last[b].double(), ref[-1], rtol=1e-5, atol=1e-5)
    # RecBole's protocol keeps RecBole's encoder
    _, _, _, net_rb, _ = _setup(env, "IISANVS")
    assert net_rb.user_encoder == "recbole"
    assert type(net_rb.trm_encoder).__module__.startswith("recbole.")


def test_loss_from_cached_states_through_the_encoder_equals_the_reference(env) -> None:
    """No stubs: the model's own item side over the cached states gives the item embeddings, the
    reference encoder above gives the user outputs on the authors' windows, the loop formula the loss."""
    cfg, ds, (train, _, _), net, _ = _setup(env, "IISANVS", paper_protocol=True)
    batch = next(iter(train))
    net.eval()  # no dropout: the reference has none
    with torch.no_grad():
        loss = float(net.calculate_loss(batch))
        E = net.compute_item_table().double()
    tok2id = {str(t): i for i, t in enumerate(ds.field2id_token[ds.iid_field])}
    windows, inputs, real = [], [], []
    users = [str(ds.id2token(ds.uid_field, int(u))) for u in batch["user_id"]]
    for u in users:
        s = truncated(SEQS[u])
        seq = [tok2id[t] for t in s[: len(s) - 2]]
        w = [0] * (T - len(seq)) + seq  # 11 left-padded slots
        windows.append(w)
        inputs.append(E[torch.tensor(w[:-1])] * torch.tensor([float(i != 0) for i in w[:-1]])[:, None])
        real.append([i != 0 for i in w[:-1]])
    with torch.no_grad():
        Q = _authors_encoder_reference(net, torch.stack(inputs), torch.tensor(real))
    counts: dict[int, int] = {}
    for s in SEQS.values():
        s = truncated(s)
        for t in s[: len(s) - 2]:
            counts[tok2id[t]] = counts.get(tok2id[t], 0) + 1
    logp = {i: math.log(c / sum(counts.values())) for i, c in counts.items()}
    ref = _reference_loss(windows, E.numpy(), Q.numpy(), logp)
    assert abs(loss - ref) < 1e-5 * max(1.0, abs(ref)), (loss, ref)


# ------------------------------------------------------------------------------------------- cache

def test_fp16_cache_refuses_states_beyond_65504(env, tmp_path: Path) -> None:
    from transformers import BertModel

    from recbole_iisan.utils.errors import CacheError
    from recbole_iisan.data.utils import prepare_inputs

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
