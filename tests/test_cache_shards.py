"""Sharded cache builds (``cache_shards: N``): N worker processes (or Ray actors) encode the same
global batches as a one-process build, so the stored keys and values are bitwise identical; a
build whose worker or caller is killed resumes, with any number of shards, to the same bytes."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from recbole_iisan.data.cache import CacheError, ensure_cache, load_states  # noqa: E402
from recbole_iisan.towers.spec import TowerSpec  # noqa: E402
from test_cache import cfg, items, lmdb_dump  # noqa: E402
from test_encoders import make_tiny_bert, make_tiny_llama, make_tiny_vit, random_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = 70  # 9 batches of 8 (the last one short), texts of 1..11 words: batches of different widths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"bert": make_tiny_bert(root / "bert"), "llama": make_tiny_llama(root / "llama")}


def test_two_shards_store_exactly_what_one_process_stores(tiny, tmp_path, caplog):
    tokens, texts = items(N, seed=11)
    spec = TowerSpec("text", "text", str(tiny["bert"]), ("title",), 12)
    one = ensure_cache(cfg(tmp_path / "a"), spec, [0, 2, 4], tokens, texts)
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        two = ensure_cache(cfg(tmp_path / "b", cache_shards=2), spec, [0, 2, 4], tokens, texts)
    assert "70 items in 9 batches over 2 local worker processes" in caplog.text
    assert two.name == one.name
    dump = lmdb_dump(two)
    assert len(dump) == N and dump == lmdb_dump(one)  # same keys, bitwise same values
    m1, m2 = (json.loads((f / "manifest.json").read_text()) for f in (one, two))
    assert m2["store"]["entries"] == m1["store"]["entries"] == N
    assert torch.equal(load_states(two, tokens, [2, 4])[0], load_states(one, tokens, [2, 4])[0])


def test_image_tower_two_shards_equal_one_process(tmp_path, caplog):
    """Image batches are read from the LMDB image store inside each worker."""
    images = pytest.importorskip("recbole_iisan.data.images")
    tokens = [f"I{i:03d}" for i in range(20)]
    src = tmp_path / "imgs"
    src.mkdir()
    for tok, img in zip(tokens, random_images(len(tokens))):
        img.save(src / f"{tok}.png")
    images.import_images(src, tmp_path / "store.lmdb", item_tokens=tokens, progress=False)
    store = images.ImageStore(tmp_path / "store.lmdb")
    spec = TowerSpec("image", "image", str(make_tiny_vit(tmp_path / "vit")))
    one = ensure_cache(cfg(tmp_path / "a"), spec, [0, 2], tokens, image_store=store)
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        two = ensure_cache(cfg(tmp_path / "b", cache_shards=2), spec, [0, 2], tokens, image_store=store)
    assert "20 items in 3 batches over 2 local worker processes" in caplog.text
    assert len(lmdb_dump(two)) == 20 and lmdb_dump(two) == lmdb_dump(one)


def test_killed_worker_then_resume_equals_one_process_build(tiny, tmp_path, caplog):
    tokens, texts = items(N, seed=12)
    spec = TowerSpec("text", "text", str(tiny["llama"]), ("title",), 8)
    clean = lmdb_dump(ensure_cache(cfg(tmp_path / "a"), spec, [0, 1, 3], tokens, texts))
    c = cfg(tmp_path / "b", cache_shards=2)
    killed: list[int] = []

    def kill_a_worker(done, total):
        if done >= 16 and not killed:
            victim = mp.active_children()[0]
            killed.append(victim.pid)
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(30)
            time.sleep(1.0)  # the pool notices the death before the next batch is handed out

    with pytest.raises(CacheError, match=r"an encoder worker died .* items are stored: run the build again to resume"):
        ensure_cache(c, spec, [0, 1, 3], tokens, texts, on_batch=kill_a_worker)
    assert killed
    folder = next((tmp_path / "b" / "cache").iterdir())
    assert not (folder / "COMPLETE").exists()
    part = lmdb_dump(folder)
    assert 16 <= len(part) < N and all(clean[k] == v for k, v in part.items())
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        assert ensure_cache(c, spec, [0, 1, 3], tokens, texts) == folder
    assert f"resuming, {len(part)} of {N} items already stored" in caplog.text
    assert lmdb_dump(folder) == clean


def test_killed_caller_of_a_two_shard_build_resumes_with_one_shard(tiny, tmp_path):
    """SIGKILL of the process that commits (no cleanup): its workers end, what was committed is
    kept, and a one-process run finishes the cache to the same bytes."""
    tokens, texts = items(N, seed=13)
    spec = TowerSpec("text", "text", str(tiny["bert"]), ("title",), 12)
    clean = lmdb_dump(ensure_cache(cfg(tmp_path / "a"), spec, [1, 3], tokens, texts))
    c = cfg(tmp_path / "b", cache_shards=2)
    pids = tmp_path / "worker_pids"
    script = textwrap.dedent(f"""
        import multiprocessing as mp, os, signal
        from recbole_iisan.data.cache import ensure_cache
        from recbole_iisan.towers.spec import TowerSpec
        def cb(done, total):
            if done >= 32:
                open({str(pids)!r}, "w").write(" ".join(str(p.pid) for p in mp.active_children()))
                os.kill(os.getpid(), signal.SIGKILL)
        ensure_cache({c!r}, TowerSpec("text", "text", {spec.encoder!r}, ("title",), 12), [1, 3],
                     {tokens!r}, {texts!r}, on_batch=cb)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == -9, r.stderr[-3000:]
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.5)
    left = [p for p in workers if _alive(p)]
    for p in left:  # do not leave them behind, but fail
        os.kill(p, signal.SIGKILL)
    assert not left, "workers outlived their killed caller"
    folder = next((tmp_path / "b" / "cache").iterdir())
    part = lmdb_dump(folder)
    assert 32 <= len(part) < N and not (folder / "COMPLETE").exists()
    assert ensure_cache(dict(c, cache_shards=1), spec, [1, 3], tokens, texts) == folder
    assert lmdb_dump(folder) == clean


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ray_actors_store_exactly_what_one_process_stores(tiny, tmp_path, caplog):
    """``ray_address`` set: the shards are Ray actors (here a new local instance, 2 CPUs)."""
    pytest.importorskip("ray")
    tokens, texts = items(N, seed=14)
    spec = TowerSpec("text", "text", str(tiny["bert"]), ("title",), 12)
    one = ensure_cache(cfg(tmp_path / "a"), spec, [0, 4], tokens, texts)
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        two = ensure_cache(cfg(tmp_path / "b", cache_shards=2, ray_address="local"), spec, [0, 4], tokens, texts)
    assert "over 2 Ray actors (1 CPU each)" in caplog.text
    assert lmdb_dump(two) == lmdb_dump(one)


def test_build_cache_shards_option(tmp_path, capsys):
    from recbole_iisan import build_cache

    argv = ["--dataset", "toy", "--data_path", str(tmp_path)]
    assert build_cache.make_config(argv)["cache_shards"] == 1  # properties/overall.yaml
    assert build_cache.make_config(argv + ["--shards", "3"])["cache_shards"] == 3
    assert build_cache.make_config(argv + ["--cache_shards=2", "--ray_address=auto"])["ray_address"] == "auto"
    tokens, texts = items(4)
    with pytest.raises(CacheError, match="config key 'cache_shards': expected an integer >= 1, got 0"):
        ensure_cache(cfg(tmp_path, cache_shards=0), TowerSpec("text", "text", "x"), [0], tokens, texts)
