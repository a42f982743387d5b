"""LMDB image store (recbole_iisan.data.images) and ``prepare --images``."""
from __future__ import annotations

import io
import logging
import pickle
import shutil
import zipfile
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from recbole_iisan.data.images import (ImageImportReport, ImageStore, ImageStoreError,
                                       default_image_store_path, import_images)
from recbole_iisan.data.atomic_files import prepare_dataset

from conftest import SHARED  # noqa: E402  (../shared beside the repository; tests skip when absent)
POSTERS = SHARED / "datasets/ml-100k-posters"


def _pixels(seed: int, size=(7, 5)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture()
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(_pixels(1)).save(d / "a.png")
    Image.fromarray(_pixels(2)).save(d / "b.JPG", format="JPEG")
    Image.fromarray(_pixels(3)).convert("L").save(d / "sub" / "c.jpeg", format="JPEG")
    Image.fromarray(_pixels(4)).save(d / "x.png")                  # not an item: extra
    good = io.BytesIO()
    Image.fromarray(_pixels(5, (64, 64))).save(good, format="JPEG")
    (d / "e.jpg").write_bytes(good.getvalue()[:200])               # truncated: unreadable
    (d / "notes.txt").write_text("not an image")                   # ignored
    (d / "__MACOSX").mkdir()
    (d / "__MACOSX" / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS junk: ignored
    return d


def _zip(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, "am_image_xx/" + str(f.relative_to(folder)))
    return path


TOKENS = ["a", "b", "c", "e", "z"]


def _check_store(report: ImageImportReport, store_path: Path, folder: Path):
    assert report.n_stored == 3 and report.n_items == 5
    assert report.missing == ["z"]
    assert [t for t, _ in report.unreadable] == ["e"]
    assert report.extra == 1 and report.duplicates == 0 and report.n_files == 5
    assert abs(report.coverage - 0.6) < 1e-9
    text = (store_path / "report.txt").read_text()
    assert "unreadable\te\t" in text and "missing\tz" in text
    with ImageStore(store_path) as store:
        assert len(store) == 3 and store.keys() == ["a", "b", "c"]
        assert "a" in store and "e" not in store and "z" not in store and "__meta__" not in store
        assert store.get_bytes("a") == (folder / "a.png").read_bytes()
        assert store.get_bytes("b") == (folder / "b.JPG").read_bytes()
        img = store.get_image("a")
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), _pixels(1))
        assert store.get_image("c").mode == "RGB" and store.get_image("c").size == (7, 5)
        with pytest.raises(KeyError):
            store.get_image("z")
        assert store.get_bytes("z") is None
        got = store.get_images(["b", "z", "a"])
        assert got[1] is None and np.array_equal(np.asarray(got[2]), _pixels(1))


def test_import_folder(image_dir, tmp_path, caplog):
    store_path = tmp_path / "store.lmdb"
    with caplog.at_level(logging.INFO, logger="recbole_iisan.images"):
        report = import_images(image_dir, store_path, item_tokens=TOKENS, progress=False)
    _check_store(report, store_path, image_dir)
    assert ("images: 3 of 5 items (60.0%); 1 missing, 1 unreadable; 1 files for unknown items "
            f"ignored — see {store_path / 'report.txt'}") in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed


def test_import_zip_with_subfolder(image_dir, tmp_path):
    source = _zip(image_dir, tmp_path / "am_image_xx.zip")
    store_path = tmp_path / "zstore.lmdb"
    report = import_images(source, store_path, item_tokens=TOKENS, progress=False)
    _check_store(report, store_path, image_dir)


def test_reuse_and_rebuild(image_dir, tmp_path, caplog):
    store_path = tmp_path / "store.lmdb"
    import_images(image_dir, store_path, item_tokens=TOKENS, progress=False)
    with caplog.at_level(logging.INFO, logger="recbole_iisan.images"):
        again = import_images(image_dir, store_path, item_tokens=TOKENS, progress=False)
    assert again.up_to_date and "up to date" in caplog.text
    _check_store(again, store_path, image_dir)
    # other items -> rebuilt in place
    other = import_images(image_dir, store_path, item_tokens=["a", "x"], progress=False)
    assert not other.up_to_date and other.n_stored == 2 and other.extra == 3
    # no item list: every decodable file
    every = import_images(image_dir, store_path, progress=False)
    assert every.n_stored == 4 and every.n_items is None and every.missing == []
    assert "4 stored" in every.summary()
    with ImageStore(store_path) as store:
        assert store.keys() == ["a", "b", "c", "x"]


def test_store_read_only_and_reopen(image_dir, tmp_path):
    store_path = tmp_path / "store.lmdb"
    import_images(image_dir, store_path, item_tokens=TOKENS, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in store_path.iterdir()}
    s1, s2 = ImageStore(store_path), ImageStore(store_path)   # two readers at once
    assert s1.get_bytes("a") == s2.get_bytes("a")
    s3 = pickle.loads(pickle.dumps(s1))                        # e.g. sent to a worker
    assert s3.get_image("b").size == (7, 5)
    for s in (s1, s2, s3):
        s.close()
    with ImageStore(store_path) as s4:                         # reopened after close
        assert len(s4) == 3
    assert {p.name: p.stat().st_mtime_ns for p in store_path.iterdir()} == before


def test_not_a_store(tmp_path):
    with pytest.raises(ImageStoreError, match=str(tmp_path / "nope")):
        ImageStore(tmp_path / "nope")
    partial = tmp_path / "partial.lmdb"
    env = lmdb.open(str(partial), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"a", b"xx")
    env.close()
    with pytest.raises(ImageStoreError, match="incomplete image store"):
        ImageStore(partial)
    with pytest.raises(ImageStoreError, match="image source not found"):
        import_images(tmp_path / "missing.zip", tmp_path / "s.lmdb", progress=False)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ImageStoreError, match="expected a folder or a .zip"):
        import_images(bad, tmp_path / "s.lmdb", progress=False)


def test_default_path():
    assert default_image_store_path("dataset/", "Scientific") == \
        Path("dataset/Scientific/Scientific_images.lmdb")


def test_prepare_with_images(image_dir, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "am_Toy_users.tsv").write_text("u1\ta b c e z\nu2\tz e c b a\n")
    (raw / "Toy_items.tsv").write_text("a\tA\nb\tB\nc\tC\ne\tE\nz\tZ\nq\tQ\n")
    res = prepare_dataset("Toy", raw, tmp_path / "d", images=image_dir)
    assert res["images"]["n_stored"] == 3 and res["images"]["missing"] == ["z"]
    assert res["images"]["n_items"] == 5
    store_path = default_image_store_path(tmp_path / "d", "Toy")
    with ImageStore(store_path) as store:
        assert store.keys() == ["a", "b", "c"]
    again = prepare_dataset("Toy", raw, tmp_path / "d", images=image_dir)
    assert again["up_to_date"] and again["images"]["up_to_date"]


@pytest.mark.skipif(not POSTERS.is_dir(), reason="ml-100k posters not available")
def test_real_posters(tmp_path):
    src = tmp_path / "posters"
    src.mkdir()
    names = sorted(POSTERS.iterdir())[:5]
    for p in names:
        shutil.copy(p, src / p.name)
    tokens = [p.stem for p in names] + ["99999"]
    report = import_images(src, tmp_path / "p.lmdb", item_tokens=tokens, progress=False)
    assert report.n_stored == 5 and report.missing == ["99999"] and not report.unreadable
    with ImageStore(tmp_path / "p.lmdb") as store:
        for p in names:
            img = store.get_image(p.stem)
            ref = Image.open(p).convert("RGB")
            assert img.size == ref.size and np.array_equal(np.asarray(img), np.asarray(ref))
            assert store.get_bytes(p.stem) == p.read_bytes()



def _read_pickled(store: ImageStore) -> bytes:
    return store.get_bytes("a")


_INHERITED = {}


def _read_inherited(_) -> bytes:
    return _INHERITED["store"].get_bytes("b")


def test_store_after_fork(image_dir, tmp_path):
    """DataLoader-style use: the store goes to forked workers, pickled or inherited."""
    import multiprocessing as mp

    store_path = tmp_path / "store.lmdb"
    import_images(image_dir, store_path, item_tokens=TOKENS, progress=False)
    with ImageStore(store_path) as store:
        store.get_bytes("a")  # the parent's handle is open and used before the fork
        _INHERITED["store"] = store
        try:
            with mp.get_context("fork").Pool(2) as pool:
                pickled = pool.map_async(_read_pickled, [store, store]).get(timeout=60)
                inherited = pool.map_async(_read_inherited, [0, 1]).get(timeout=60)
        finally:
            _INHERITED.clear()
        assert pickled == [(image_dir / "a.png").read_bytes()] * 2
        assert inherited == [(image_dir / "b.JPG").read_bytes()] * 2
        assert store.get_bytes("b") == (image_dir / "b.JPG").read_bytes()  # parent still reads
