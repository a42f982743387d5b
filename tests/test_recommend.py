"""Recommendations out of a trained checkpoint, export, new items and the test breakdown, on a tiny
IISANVS trained through the plugin's own pipeline (real tiny BERT encoders, real LMDB caches)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DINOV2, WORDS, write_tiny_dataset
from recbole_iisan.quick_start import cli
from recbole_iisan.utils.errors import EXIT_USER_ERROR


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny IISANVS trained 2 epochs (state_norm: dim, so new items use the trained statistics)."""
    from test_encoders import make_tiny_bert

    from recbole_iisan.quick_start.pipeline import run

    root = tmp_path_factory.mktemp("rec")
    write_tiny_dataset(root / "data")
    enc = {"a": str(make_tiny_bert(root / "bert")), "b": str(make_tiny_bert(root / "bert2", seed=1))}
    cd = {"data_path": str(root / "data"), "checkpoint_dir": str(root / "ckpt"), "cache_dir": str(root / "cache"),
          "towers": ["text", "text2"], "text_encoder": enc["a"], "text2_encoder": enc["b"],
          "text_fields": ["title"], "text2_fields": ["title"], "epochs": 2, "train_batch_size": 64,
          "eval_batch_size": 128, "embedding_size": 16, "sanb_size": 8, "inner_size": 32,
          "encoder_batch_size": 16, "state_norm": "dim", "cache_dtype": "float32", "show_progress": False}
    result = run("IISANVS", "tiny", config_dict=cd, result_file=str(root / "res.json"))
    return {"root": root, "ckpt": result["checkpoint"], "result": result, "config_dict": cd, "enc": enc}


def _histories(data: Path) -> dict[str, list[str]]:
    """Raw item ids per user in time order, read straight from the atomic file."""
    with open(data / "tiny" / "tiny.inter") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    out: dict[str, list[tuple[float, int, str]]] = {}
    for k, (u, i, t) in enumerate(rows):
        out.setdefault(u, []).append((float(t), k, i))
    return {u: [i for _, _, i in sorted(v)] for u, v in out.items()}


def test_recommend_is_the_top_of_full_sort_predict(trained) -> None:
    from recbole.data.interaction import Interaction

    from recbole_iisan.serving.recommend import load_run, recommend

    run = load_run(trained["ckpt"])
    hist = _histories(trained["root"] / "data")
    users = ["u3", "u17", "u42"]
    df = recommend(run, users=users, topk=5)
    assert list(df.columns) == ["user", "rank", "item_id", "title", "score"]
    L = run.max_len
    model = run.model
    for u in users:
        got = df[df.user == u]
        ids = list(got.item_id)
        assert len(ids) == 5 and len(set(ids)) == 5
        assert not set(ids) & set(hist[u])  # the user's own history is excluded
        # independently: the user's last L items -> full_sort_predict, history and padding masked
        seq = [run.dataset.token2id(run.iid_field, t) for t in hist[u][-L:]]
        inter = Interaction({model.ITEM_SEQ: torch.tensor([seq + [0] * (L - len(seq))]),
                             model.ITEM_SEQ_LEN: torch.tensor([len(seq)])})
        with torch.no_grad():
            scores = model.full_sort_predict(inter)[0].clone()
        scores[0] = -np.inf
        scores[[run.dataset.token2id(run.iid_field, t) for t in hist[u]]] = -np.inf
        top = torch.topk(scores, 5)
        assert ids == [run.dataset.id2token(run.iid_field, int(i)) for i in top.indices]
        np.testing.assert_allclose(got.score.to_numpy(), top.values.numpy(), rtol=1e-6)
        assert all(t.startswith(tuple(WORDS)) for t in got.title)  # titles from the item file
    # a raw-id sequence equal to a user's history gives that user's recommendations
    seq_df = recommend(run, sequences=[hist["u3"]], topk=5)
    assert list(seq_df.item_id) == list(df[df.user == "u3"].item_id)
    # with the history included, history items may come back
    inc = recommend(run, users=["u3"], topk=run.n_items - 1, exclude_history=False)
    assert set(hist["u3"]) <= set(inc.item_id)


def test_recommend_cli(trained, capsys) -> None:
    out_tsv = trained["root"] / "rec.tsv"
    code = cli.main([f"--recommend={trained['ckpt']}", "--users=u3,u5", "--topk=3", f"--recommend_file={out_tsv}"])
    assert code == 0
    text = capsys.readouterr().out
    assert "user u3:" in text and "user u5:" in text
    rows = list(csv.DictReader(open(out_tsv), delimiter="\t"))
    assert len(rows) == 6 and all(r["item_id"] in text for r in rows)
    # bad input: one line, exit code 2
    assert cli.main([f"--recommend={trained['ckpt']}", "--users=nobody"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nobody" in err[0]
    assert cli.main([f"--recommend={trained['ckpt']}", "--sequence=i1 zzz"]) == EXIT_USER_ERROR
    assert "zzz" in capsys.readouterr().err


def test_export_reproduces_recommend(trained) -> None:
    from recbole_iisan.serving.export import load_export, topk_from_export
    from recbole_iisan.serving.recommend import load_run, recommend

    run = load_run(trained["ckpt"])
    out = trained["root"] / "export"
    assert cli.main([f"--recommend={trained['ckpt']}", f"--export={out}"]) == 0
    table, ids, enc = load_export(out)
    assert table.dtype == np.float32 and table.shape == (run.n_items, 16)
    assert ids == list(run.item_tokens())
    meta = json.loads((out / "export.json").read_text())
    assert meta["max_seq_length"] == run.max_len and meta["n_items"] == run.n_items
    with torch.no_grad():
        np.testing.assert_allclose(table, run.model.item_table().numpy(), rtol=0, atol=0)
    users = ["u0", "u3", "u9"]  # a batch size the encoder was not traced with
    df = recommend(run, users=users, topk=7)
    seq, lengths, history = run.user_histories(users)
    top, scores = topk_from_export(out, seq, lengths, k=7, history=history)
    assert [[ids[i] for i in row] for row in top] == [list(df[df.user == u].item_id) for u in users]
    np.testing.assert_allclose(scores.reshape(-1), df.score.to_numpy(), rtol=1e-5, atol=1e-5)


def _new_items_tsv(path: Path) -> list[tuple[str, str]]:
    items = [("new1", "red pipette glass flask"), ("new2", "digital lab scale 10 ml"), ("new3", "steel clamp box")]
    path.write_text("".join(f"{i}\t{t}\n" for i, t in items))
    return items


def catalogue_embeddings(run, cfg: dict, tokens: list[str]) -> torch.Tensor:
    """The trained side network's embeddings of ``tokens`` read from caches built from scratch over
    the dataset of ``cfg`` (whose item file holds them as catalogue items)."""
    from recbole_iisan.data import cache as cache_mod
    from recbole_iisan.serving.new_items import standardize_like

    folders = cache_mod.ensure_caches(cfg)
    rebuilt = []
    for tower in run.model.towers:
        states, missing = cache_mod.load_states(folders[tower], tokens, run.model.states.layers[tower], torch.float32)
        assert not missing
        rebuilt.append(standardize_like(states, run.dataset.item_states[tower]))
    with torch.no_grad():
        return run.model.side(*rebuilt).float()


def test_new_items_equal_a_rebuilt_cache(trained, tmp_path) -> None:
    from recbole_iisan.serving.new_items import encode_new_items
    from recbole_iisan.serving.recommend import load_run, recommend

    run = load_run(trained["ckpt"])
    items = _new_items_tsv(tmp_path / "new.tsv")
    tokens = [i for i, _ in items]
    new = encode_new_items(run, tmp_path / "new.tsv")
    assert new.embeddings.shape == (3, 16) and torch.isfinite(new.embeddings).all()

    # from scratch: the dataset's item file with the new items added, a fresh cache folder
    data2 = tmp_path / "data2"
    write_tiny_dataset(data2)
    with open(data2 / "tiny" / "tiny.item", "a") as f:
        f.writelines(f"{i}\t{t}\n" for i, t in items)
    from conftest import plugin_defaults

    cfg = {**plugin_defaults(), **trained["config_dict"], "data_path": str(data2), "cache_dir": str(tmp_path / "cache2"),
           "dataset": "tiny"}
    model = run.model
    expected = catalogue_embeddings(run, cfg, tokens)
    torch.testing.assert_close(new.embeddings, expected, rtol=1e-5, atol=1e-5)
    # the known items' embeddings are unchanged (the trained model is untouched)
    with torch.no_grad():
        known = model.item_table()[1:4]
        ids = torch.tensor([run.dataset.token2id(run.iid_field, t) for t in ["i0", "i1", "i2"]])
        torch.testing.assert_close(known, model.item_embeddings(torch.arange(1, 4)))
        assert ids.numel() == 3

    # ranked together with the known items; a sequence may hold new items
    df = recommend(run, users=["u3"], topk=run.n_items + 2, new_items=tmp_path / "new.tsv")
    assert set(tokens) <= set(df.item_id) and df.score.is_monotonic_decreasing
    assert dict(zip(df.item_id, df.title))["new2"] == "digital lab scale 10 ml"
    seq_df = recommend(run, sequences=[["i1", "new1"]], topk=5, new_items=tmp_path / "new.tsv")
    assert "new1" not in set(seq_df.item_id) and len(seq_df) == 5


def test_new_items_bad_file_is_one_line(trained, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("n1\tok title\nn2\n")
    assert cli.main([f"--recommend={trained['ckpt']}", "--users=u3", f"--new_items={bad}"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2" in err[0]
    bad.write_text("i3\talready known\n")
    assert cli.main([f"--recommend={trained['ckpt']}", "--users=u3", f"--new_items={bad}"]) == EXIT_USER_ERROR
    assert "already an item" in capsys.readouterr().err


def test_breakdown_in_the_result_file_adds_up_to_recbole_metrics(trained) -> None:
    res = json.loads((trained["root"] / "res.json").read_text())
    bd = res["breakdown"]
    test = res["test_result"]
    n = bd["overall"]["n"]
    assert n == 60  # one test example per user
    for key in ("hit@10", "ndcg@10"):
        assert bd["overall"][key] == pytest.approx(test[key], abs=1e-4)  # RecBole rounds to 4 digits
        for dim in ("target_frequency", "target", "history_length"):
            buckets = bd[dim].values()
            assert sum(b["n"] for b in buckets) == n
            weighted = sum(b[key] * b["n"] for b in buckets if b["n"]) / n
            assert weighted == pytest.approx(bd["overall"][key], abs=1e-9)
    assert list(bd["target_frequency"]) == ["0", "1-4", "5-19", "20+"]


def test_training_frequency_counts_training_interactions(trained) -> None:
    from recbole_iisan.data.dataset import training_frequency
    from recbole_iisan.serving.recommend import load_run

    run = load_run(trained["ckpt"])
    freq = training_frequency(run.train_data._dataset, run.n_items)
    hist = _histories(trained["root"] / "data")
    # leave-one-out: every interaction but each user's last two is a training interaction
    expected = np.zeros(run.n_items, dtype=np.int64)
    for items in hist.values():
        for t in items[:-2]:
            expected[run.dataset.token2id(run.iid_field, t)] += 1
    np.testing.assert_array_equal(freq, expected)


def test_sasrec_recommend_and_export(tmp_path: Path) -> None:
    """RecBole's own SASRec goes through the same recommend / export path (its id embedding table)."""
    from recbole_iisan.serving.export import topk_from_export
    from recbole_iisan.quick_start.pipeline import run
    from recbole_iisan.serving.recommend import load_run, recommend

    write_tiny_dataset(tmp_path / "data")
    res = run("SASRec", "tiny", config_dict={"data_path": str(tmp_path / "data"), "epochs": 1,
                                             "checkpoint_dir": str(tmp_path / "ck"), "hidden_size": 16,
                                             "n_layers": 1, "n_heads": 1, "inner_size": 32},
              result_file=str(tmp_path / "r.json"))
    r = load_run(res["checkpoint"])
    users = ["u1", "u2"]
    df = recommend(r, users=users, topk=5)
    assert cli.main([f"--recommend={res['checkpoint']}", f"--export={tmp_path / 'ex'}"]) == 0
    seq, lengths, history = r.user_histories(users)
    top, _ = topk_from_export(tmp_path / "ex", seq, lengths, k=5, history=history)
    tokens = r.item_tokens()
    assert [list(tokens[row]) for row in top] == [list(df[df.user == u].item_id) for u in users]
    # SASRec cannot embed new items
    (tmp_path / "new.tsv").write_text("n1\tsome title\n")
    with pytest.raises(Exception, match="content model"):
        recommend(r, users=users, new_items=tmp_path / "new.tsv")


# --------------------------------------------------------------------------------------------
# serving takes the training flags; a --dataset / --model that contradicts the checkpoint is one
# line; the answer prints without third-party warnings (the real command line, in a subprocess)

def _cli(*args: str, cwd: Path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, str(repo / "run_recbole_iisan.py"), *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def sasrec_cli(tmp_path_factory):
    """SASRec trained by the command line with --data_path=DIR (the parent of DIR/tiny)."""
    root = tmp_path_factory.mktemp("serveflags")
    write_tiny_dataset(root / "data")
    out = root / "r.json"
    proc = _cli("--model=SASRec", "--dataset=tiny", f"--data_path={root / 'data'}", f"--checkpoint_dir={root / 'saved'}",
                "--epochs=1", "--hidden_size=16", "--inner_size=32", "--n_layers=1", "--n_heads=1",
                "--train_batch_size=256", "--eval_batch_size=256", f"--result_file={out}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "ckpt": json.loads(out.read_text())["checkpoint"]}


def _answer(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.strip()]


def test_recommend_takes_the_training_data_path_and_prints_no_warning(sasrec_cli):
    root, ck = sasrec_cli["root"], sasrec_cli["ckpt"]
    same = _cli(f"--recommend={ck}", f"--data_path={root / 'data'}", "--users=u1,u2", "--topk=3", cwd=root)
    lines = _answer(same)
    assert "user u1:" in same.stdout and "user u2:" in same.stdout
    assert not [line for line in (same.stdout + same.stderr).splitlines() if "Warning" in line], same.stderr
    # the dataset moved: the checkpoint's own data_path is gone, --data_path (as at training) finds it
    moved = root / "moved"
    (moved / "tiny").mkdir(parents=True)
    for f in (root / "data" / "tiny").glob("tiny.*"):
        (moved / "tiny" / f.name).write_bytes(f.read_bytes())
    (root / "data").rename(root / "gone")
    try:
        again = _cli(f"--recommend={ck}", f"--data_path={moved}", "--users=u1,u2", "--topk=3", cwd=root)
        assert _answer(again) == lines
        # the same through --config_files, and a --key=value of the training flags
        (root / "serve.yaml").write_text(f"data_path: {moved}\n")
        by_file = _cli(f"--recommend={ck}", f"--config_files={root / 'serve.yaml'}", "--eval_batch_size=64",
                       "--users=u1,u2", "--topk=3", cwd=root)
        assert _answer(by_file) == lines
    finally:
        (root / "gone").rename(root / "data")


@pytest.mark.parametrize("flag, expected", [
    ("--dataset=ml-100k", "the checkpoint was trained on tiny; drop --dataset or pass a checkpoint of ml-100k"),
    ("--model=GRU4Rec", "the checkpoint holds a SASRec model; drop --model or pass a checkpoint of GRU4Rec"),
])
def test_a_dataset_or_model_contradicting_the_checkpoint_is_one_line(sasrec_cli, flag, expected):
    proc = _cli(f"--recommend={sasrec_cli['ckpt']}", flag, "--users=u1", cwd=sasrec_cli["root"])
    assert proc.returncode == EXIT_USER_ERROR
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    # the same model / dataset given again is fine
    ok = _cli(f"--recommend={sasrec_cli['ckpt']}", "--dataset=tiny", "--model=SASRec", "--users=u1",
              cwd=sasrec_cli["root"])
    assert "user u1:" in ok.stdout, ok.stderr[-3000:]


def _smooth_png(path: Path, seed: int) -> None:
    """A photo-like (smooth) random image, not square."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    Image.fromarray(base).resize((50, 70), resample=3).save(path)


@pytest.mark.skipif(not DINOV2.is_dir(), reason=f"{DINOV2} absent (the shared dinov2-small)")
def test_new_items_with_an_image_tower_equal_the_same_items_in_the_catalogue(tmp_path) -> None:
    """--new_items through a model with an image tower (IISANVA, dinov2-small): the new items' embeddings
    and scores equal those of the same items built as catalogue items from scratch (their images
    in the dataset's image folder, a fresh cache)."""
    from test_encoders import make_tiny_bert

    from conftest import plugin_defaults
    from recbole_iisan.quick_start.pipeline import run as train
    from recbole_iisan.serving.new_items import encode_new_items
    from recbole_iisan.serving.recommend import load_run, recommend

    n_items = 16
    write_tiny_dataset(tmp_path / "data", n_users=30, n_items=n_items, seq_len=(5, 7))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(n_items):
        _smooth_png(imgs / f"i{i}.png", i)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    items = [("new1", "red glass flask", "new1.png"), ("new2", "steel clamp set", "pics/new2.png")]
    (new_dir / "pics").mkdir()
    for k, (_, _, rel) in enumerate(items):
        _smooth_png(new_dir / rel, 100 + k)
    (new_dir / "new.tsv").write_text("".join(f"{i}\t{t}\t{p}\n" for i, t, p in items))

    cd = {"data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "ckpt"),
          "cache_dir": str(tmp_path / "cache"), "towers": ["text", "image"],
          "text_encoder": str(make_tiny_bert(tmp_path / "bert")), "text_fields": ["title"],
          "image_encoder": str(DINOV2), "image_dir": str(imgs), "image_backend": "pil",
          "epochs": 1, "train_batch_size": 64, "eval_batch_size": 128, "embedding_size": 16, "sanb_size": 8,
          "inner_size": 32, "encoder_batch_size": 16, "state_norm": "dim", "cache_dtype": "float32",
          "show_progress": False}
    result = train("IISANVA", "tiny", config_dict=cd, result_file=str(tmp_path / "res.json"))
    run = load_run(result["checkpoint"])
    assert run.model.towers == ["text", "image"]
    new = encode_new_items(run, new_dir / "new.tsv")
    tokens = [i for i, _, _ in items]

    # from scratch: the new items as catalogue items (item file, image folder), a fresh cache
    data2 = tmp_path / "data2"
    write_tiny_dataset(data2, n_users=30, n_items=n_items, seq_len=(5, 7))
    with open(data2 / "tiny" / "tiny.item", "a") as f:
        f.writelines(f"{i}\t{t}\n" for i, t, _ in items)
    imgs2 = tmp_path / "imgs2"
    imgs2.mkdir()
    for p in imgs.iterdir():
        (imgs2 / p.name).symlink_to(p)
    for i, _, rel in items:
        (imgs2 / f"{i}.png").symlink_to(new_dir / rel)
    cfg = {**plugin_defaults(), **cd, "data_path": str(data2), "cache_dir": str(tmp_path / "cache2"),
           "image_dir": str(imgs2), "dataset": "tiny"}
    model = run.model
    expected = catalogue_embeddings(run, cfg, tokens)
    torch.testing.assert_close(new.embeddings, expected, rtol=1e-4, atol=1e-4)

    # their scores: the user's representation times the catalogue-built embeddings
    df = recommend(run, users=["u3"], topk=run.n_items + len(items), new_items=new_dir / "new.tsv")
    seq, lengths, _ = run.user_histories(["u3"])
    with torch.no_grad():
        table = model.item_table()
        s = torch.as_tensor(seq)
        user = model.gather_indexes(model.encode_sequence(table[s], s), torch.as_tensor(lengths) - 1)
        want = (user @ expected.t())[0]
    got = df.set_index("item_id").score
    np.testing.assert_allclose([got[t] for t in tokens], want.numpy(), rtol=1e-4, atol=1e-4)
