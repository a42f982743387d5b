"""A damaged hidden-state cache is never used: truncated, emptied, overwritten or edited copies of
a tiny real cache give one ``CacheError`` line naming the folder (``load_states``,
``cache_rebuild: never``, ``build_cache``) or a logged rebuild that ends bitwise equal to the
clean cache (``cache_rebuild: auto``), and never a signal death (loads run in a child process)."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from recbole_iisan.data import cache as cache_mod  # noqa: E402
from recbole_iisan.data.cache import CacheError, ensure_caches, load_states  # noqa: E402
from recbole_iisan.data.cache.layout import open_env  # noqa: E402
from test_cache import cfg, lmdb_dump, write_dataset  # noqa: E402
from test_encoders import make_tiny_bert  # noqa: E402

N_ITEMS = 40


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A complete cache of a 40-item dataset (tiny BERT text tower): its config, folder, items."""
    root = tmp_path_factory.mktemp("clean")
    bert = make_tiny_bert(root / "bert")
    tokens, _ = write_dataset(root, n=N_ITEMS)
    c = cfg(root, towers=["text", "text2"], text_encoder=str(bert), text2_encoder=str(bert),
            text2_fields=["title", "brand"], text_max_length=12)
    folder = ensure_caches(c)["text"]
    man = json.loads((folder / "manifest.json").read_text())
    return {"root": root, "config": c, "folder": folder, "tokens": tokens, "layers": man["layers"],
            "dump": lmdb_dump(folder)}


def copy_of(clean, tmp_path: Path) -> tuple[dict, Path]:
    """A copy of the clean cache folders under ``tmp_path``, the config that uses them and the
    copy of the text tower's folder (the one the tests damage)."""
    c = dict(clean["config"], cache_dir=str(tmp_path / "cache"))
    shutil.copytree(clean["folder"].parent, tmp_path / "cache")
    return c, tmp_path / "cache" / clean["folder"].name


# --------------------------------------------------------------------------------------------
# the damage

def truncate(folder: Path) -> None:  # a partial copy, a full disk
    data = folder / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)


def zero_bytes(folder: Path) -> None:
    os.truncate(folder / "data.mdb", 0)


def flip_value(folder: Path) -> None:
    """Overwrite 4 bytes of the last stored layer of one value, wherever the file holds it (LMDB
    may keep stale copies of a page, so every copy is hit)."""
    env = open_env(folder, 0, readonly=True)
    with env.begin() as txn:
        value = txn.get(b"I0007")
    env.close()
    raw = bytearray((folder / "data.mdb").read_bytes())
    at, hits = raw.find(value), 0
    while at >= 0:
        for k in range(at + len(value) - 20, at + len(value) - 16):
            raw[k] ^= 0x5A
        hits += 1
        at = raw.find(value, at + 1)
    assert hits >= 1
    (folder / "data.mdb").write_bytes(bytes(raw))


def _edit_manifest(folder: Path, fn) -> None:
    path = folder / "manifest.json"
    man = json.loads(path.read_text())
    fn(man)
    path.write_text(json.dumps(man))


def manifest_identity(folder: Path) -> None:  # the manifest of another cache (other pooling)
    _edit_manifest(folder, lambda m: m["identity"].update(pooling="mean"))


def manifest_layers(folder: Path) -> None:  # the same number of layers, other indices
    _edit_manifest(folder, lambda m: m.update(layers=m["layers"][:-1] + [m["layers"][-1] - 1]))


def manifest_dtype(folder: Path) -> None:  # same size per value, other meaning
    _edit_manifest(folder, lambda m: m.update(dtype="bfloat16"))


def manifest_item_count(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m.update(item_count=m["item_count"] + 1))


DAMAGE = [truncate, zero_bytes, flip_value, manifest_identity, manifest_layers, manifest_dtype,
          manifest_item_count]


# --------------------------------------------------------------------------------------------
# load_states in a child process: a signal death is an exit code, not a dead test run

def _child_load(conn, folder: str, tokens: list, layers: list) -> None:
    torch.set_num_threads(1)
    try:
        states, missing = load_states(folder, tokens, layers, dtype=torch.float32)
        conn.send(f"loaded {tuple(states.shape)}, {len(missing)} missing")
        code = 0
    except CacheError as exc:
        conn.send(f"CacheError: {exc}")
        code = 3
    except BaseException:  # noqa: BLE001
        conn.send(traceback.format_exc())
        code = 4
    conn.close()
    os._exit(code)


def load_in_child(folder: Path, tokens: list, layers: list) -> tuple[int, str]:
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_load, args=(send, str(folder), tokens, layers))
    p.start()
    send.close()
    p.join(120)
    if p.is_alive():
        p.kill()
        p.join()
    return p.exitcode, _received(recv)


def _received(conn) -> str:
    try:
        return conn.recv() if conn.poll() else ""
    except EOFError:  # the child died (a signal) before sending
        return ""


def assert_one_line_naming(msg: str, folder: Path) -> None:
    assert msg.count("\n") == 0 and str(folder) in msg and "damaged" in msg, msg


# --------------------------------------------------------------------------------------------

def test_clean_copy_loads(clean, tmp_path):
    _, folder = copy_of(clean, tmp_path)
    code, msg = load_in_child(folder, clean["tokens"], clean["layers"])
    assert code == 0 and msg.startswith(f"loaded ({N_ITEMS}, {len(clean['layers'])}, 32), 0 missing"), msg


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_load_states_refuses_damaged_cache(clean, tmp_path, damage):
    _, folder = copy_of(clean, tmp_path)
    damage(folder)
    # the layers the (damaged) manifest says are stored: what a model reading them would ask for
    layers = json.loads((folder / "manifest.json").read_text())["layers"]
    code, msg = load_in_child(folder, clean["tokens"], layers)
    assert code == 3, f"exit code {code} (-7 is SIGBUS): {msg}"
    assert_one_line_naming(msg, folder)
    assert "build_cache" in msg


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_cache_is_refused_with_never_and_rebuilt_with_auto(clean, tmp_path, damage, caplog):
    c, folder = copy_of(clean, tmp_path)
    damage(folder)
    with pytest.raises(CacheError) as err:
        ensure_caches(dict(c, cache_rebuild="never"))
    assert_one_line_naming(str(err.value), folder)
    assert "cache_rebuild is 'never'" in str(err.value)
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        assert ensure_caches(c)["text"] == folder
    assert f"reusing {folder}" not in caplog.text
    assert f"cache {folder} is damaged" in caplog.text and f"rebuilding {folder}" in caplog.text
    assert lmdb_dump(folder) == clean["dump"]  # bitwise what a clean build stores
    assert load_states(folder, clean["tokens"], clean["layers"])[0].shape[0] == N_ITEMS


def test_build_cache_cli_never_says_reusing_for_a_damaged_cache(clean, tmp_path, capsys, caplog):
    from recbole_iisan import build_cache

    c, folder = copy_of(clean, tmp_path)
    truncate(folder)
    argv = ["--dataset", "toy", "--data_path", c["data_path"], "--towers=[text, text2]",
            f"--text_encoder={c['text_encoder']}", f"--text2_encoder={c['text_encoder']}", "--text2_fields=[title, brand]",
            "--text_max_length=12", f"--cache_dir={c['cache_dir']}", "--encoder_batch_size=8"]
    assert build_cache.main(argv + ["--cache_rebuild=never"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cache {folder} is damaged" in err, err
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        assert build_cache.main(argv) == 0
    assert f"reusing {folder}" not in caplog.text and f"rebuilding {folder}" in caplog.text
    assert f"text\t{folder}" in capsys.readouterr().out
    assert lmdb_dump(folder) == clean["dump"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        assert build_cache.main(argv) == 0
    assert f"reusing {folder}" in caplog.text and "every value verified" in caplog.text


def _child_resume(conn, config: dict) -> None:
    torch.set_num_threads(1)
    try:
        conn.send(str(ensure_caches(config)["text"]))
        code = 0
    except BaseException:  # noqa: BLE001
        conn.send(traceback.format_exc())
        code = 4
    conn.close()
    os._exit(code)


def test_interrupted_build_with_truncated_store_is_rebuilt_not_a_bus_error(clean, tmp_path, caplog):
    """Resuming opens the store for writing: a truncated one must be found before LMDB maps it."""
    c, folder = copy_of(clean, tmp_path)
    (folder / "COMPLETE").unlink()
    _edit_manifest(folder, lambda m: m.update(complete=False))
    truncate(folder)
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_resume, args=(send, c))
    p.start()
    send.close()
    p.join(300)
    msg = _received(recv)
    assert p.exitcode == 0, f"exit code {p.exitcode} (-7 is SIGBUS): {msg}"
    assert msg == str(folder) and lmdb_dump(folder) == clean["dump"]


def test_values_that_fail_their_check_are_encoded_again_on_resume(clean, tmp_path, caplog):
    c, folder = copy_of(clean, tmp_path)
    (folder / "COMPLETE").unlink()
    _edit_manifest(folder, lambda m: m.update(complete=False))
    flip_value(folder)
    with caplog.at_level(logging.INFO, logger="recbole_iisan.cache"):
        ensure_caches(c)
    assert "dropping 1 stored values that fail their check (first 'I0007')" in caplog.text
    assert f"resuming, {N_ITEMS - 8} of {N_ITEMS} items already stored" in caplog.text
    assert lmdb_dump(folder) == clean["dump"]


def test_verify_cache_and_manifest_store_record(clean, tmp_path):
    _, folder = copy_of(clean, tmp_path)
    man = cache_mod.verify_cache(folder)
    store = man["store"]
    assert store["data_bytes"] == (folder / "data.mdb").stat().st_size
    assert store["entries"] == N_ITEMS == man["item_count"]
    assert store["value_bytes"] == len(man["layers"]) * 32 * 2 + 4
    assert all(len(v) == store["value_bytes"] for v in clean["dump"].values())
    # a data.mdb of another cache (same size and items, other layers) fails the checksums
    manifest_layers(folder)
    man2 = json.loads((folder / "manifest.json").read_text())
    with pytest.raises(CacheError, match="fail their checksum"):
        cache_mod.verify_cache(folder)
    assert man2["layers"] != man["layers"]
