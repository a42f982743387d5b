"""Known datasets download themselves: checksum, interrupted downloads, corrupted files, offline.

Every test talks to a real HTTP server on 127.0.0.1 (``http.server`` in a thread, with HTTP range
requests and fault injection) serving small fixture files written by the test; no test reaches the
internet. The real sha256 table is for the real files; tests pass their own table or replace the
registry entry (``KNOWN_DATASETS``) with the fixture's.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import socket
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recbole_iisan.data import sources as dl
from recbole_iisan.utils.errors import DownloadError

from conftest import WORDS

USERS = "am_Toy_users.tsv"
ITEMS = "Toy_items.tsv"


# --------------------------------------------------------------------------------------------
# fixtures: raw files in the authors' format and a local HTTP server
# --------------------------------------------------------------------------------------------
def write_raw(folder: Path, n_users: int = 40, n_items: int = 30, seed: int = 0) -> dict[str, str]:
    """``folder/am_Toy_users.tsv`` + ``folder/Toy_items.tsv``; returns name -> sha256."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = "".join(f"I{i}\t{' '.join(rng.sample(WORDS, 3))} {i}\n" for i in range(n_items))
    users = "".join(f"U{u}\t{' '.join(f'I{rng.randrange(n_items)}' for _ in range(rng.randint(5, 16)))}\n"
                    for u in range(n_users))
    (folder / ITEMS).write_text(items)
    (folder / USERS).write_text(users)
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in (USERS, ITEMS)}


class _Handler(SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=N-`` support (206, or 416 past the end; ``server.ignore_range``
    answers every request with the whole file, as servers without range support do);
    ``server.cut[name] = k`` makes the next k responses for ``name`` announce their full length
    but stop after half of their bytes."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        path = Path(self.translate_path(self.path))
        srv.requests.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        m = None if srv.ignore_range else re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and int(m.group(1)) >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if m:
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut.get(path.name, 0) > 0:
            srv.cut[path.name] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    """``(base_url, root folder, server)``: a bounded HTTP server on 127.0.0.1 in a thread."""
    root = tmp_path / "www"
    root.mkdir()

    def handler(*a, **kw):
        return _Handler(*a, directory=str(root), **kw)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.requests = []
    httpd.cut = {}
    httpd.ignore_range = False
    httpd.timeout = 5
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=5)


@pytest.fixture
def toy_registry(monkeypatch, server):
    """``Toy`` is a known dataset served by the local server (its own hashes)."""
    base, root, httpd = server
    hashes = write_raw(root / "Toy")
    monkeypatch.setitem(dl.KNOWN_DATASETS, "Toy",
                        dl.KnownDataset("Toy", hashes, "am_image_toy.zip", "drive-id-of-toy"))
    monkeypatch.setenv(dl.ENV_URL, base)
    return base, root, httpd, hashes


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def one_line(msg: str) -> bool:
    return "\n" not in msg.strip()


def leftovers(folder: Path, names) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in set(names) | {dl.RECORD_FILE})


# --------------------------------------------------------------------------------------------
# the real table and URLs
# --------------------------------------------------------------------------------------------
def test_upstream_urls_are_pinned_raw_github_urls(monkeypatch):
    monkeypatch.delenv(dl.ENV_URL, raising=False)
    url = dl.source_of("Scientific", "Industrial_and_Scientific_items.tsv")
    assert url == ("https://raw.githubusercontent.com/GAIR-Lab/IISAN/"
                   "67f5c1faf12a1f9fc3258922bb05684561532d1d/Dataset/Scientific/"
                   "Industrial_and_Scientific_items.tsv")
    assert set(dl.KNOWN_DATASETS) == {"Scientific", "Instrument", "Office"}
    for spec in dl.KNOWN_DATASETS.values():
        names = sorted(spec.files)
        assert len(names) == 2 and any(n.startswith("am_") for n in names)
        assert all(h is None or re.fullmatch(r"[0-9a-f]{64}", h) for h in spec.files.values())
    assert dl.KNOWN_DATASETS["Office"].files["Office_Products_items.tsv"] is None


def test_shared_scientific_copy_matches_the_known_hashes():
    shared = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "Scientific"
    if not shared.is_dir():
        pytest.skip(f"{shared} not available")
    for name, sha in dl.KNOWN_DATASETS["Scientific"].files.items():
        assert hashlib.sha256((shared / name).read_bytes()).hexdigest() == sha


# --------------------------------------------------------------------------------------------
# download + checksum
# --------------------------------------------------------------------------------------------
def test_download_checks_sha256_records_it_and_is_not_repeated(server, tmp_path):
    base, root, httpd = server
    hashes = write_raw(root / "Toy")
    dest = tmp_path / "raw"
    out = dl.fetch_raw_dataset("Toy", dest, base_url=base, files=hashes, progress=False)
    assert out == dest
    for name, sha in hashes.items():
        assert (dest / name).read_bytes() == (root / "Toy" / name).read_bytes()
        assert oct((dest / name).stat().st_mode & 0o077) != "0o0"  # not a private 0600 temp mode
    record = json.loads((dest / dl.RECORD_FILE).read_text())
    assert {n: r["sha256"] for n, r in record.items()} == hashes
    assert record[USERS]["source"] == f"{base}/Toy/{USERS}" and record[USERS]["verified"]
    assert leftovers(dest, hashes) == []
    n = len(httpd.requests)
    assert n == 2
    dl.fetch_raw_dataset("Toy", dest, base_url=base, files=hashes, progress=False)
    assert len(httpd.requests) == n  # verified on disk, not fetched again


def test_base_ending_in_the_dataset_name_is_the_dataset_folder(server, tmp_path):
    base, root, httpd = server
    hashes = write_raw(root / "Toy")
    dl.fetch_raw_dataset("Toy", tmp_path / "raw", base_url=f"{base}/Toy/", files=hashes,
                         progress=False)
    assert sorted(p for p, _ in httpd.requests) == sorted(f"/Toy/{n}" for n in hashes)


def test_corrupted_download_is_refused_with_one_line_and_not_kept(server, tmp_path):
    base, root, httpd = server
    hashes = write_raw(root / "Toy")
    (root / "Toy" / USERS).write_text("U0\tI1 I2 I3 I4 I5\n")  # served content != known hash
    dest = tmp_path / "raw"
    with pytest.raises(DownloadError) as ei:
        dl.fetch_raw_dataset("Toy", dest, base_url=base, files=hashes, progress=False, retries=1)
    msg = str(ei.value)
    assert one_line(msg)
    assert f"{USERS} of Toy from {base}/Toy/{USERS} failed its checksum" in msg
    assert hashes[USERS] in msg and "was not kept" in msg and "--raw_dir" in msg
    assert not (dest / USERS).exists()
    assert leftovers(dest, hashes) == []  # no temporary file left behind
    # a corrupted file already under the final name is not taken as valid either
    (dest / USERS).write_text("U0\tI1 I2 I3 I4 I5\n")
    (root / "Toy" / USERS).unlink()
    with pytest.raises(DownloadError, match="HTTP 404"):
        dl.fetch_raw_dataset("Toy", dest, base_url=base, files=hashes, progress=False, retries=0)
    assert not (dest / USERS).exists()


def test_interrupted_download_resumes_byte_wise_with_range_requests(server, tmp_path):
    base, root, httpd = server
    hashes = write_raw(root / "Toy")
    full = (root / "Toy" / USERS).read_bytes()
    dest = tmp_path / "raw"
    part = dest / f"{USERS}.part"
    httpd.cut[USERS] = 2  # the connection drops half way, twice (= 1 try + 1 retry)
    with pytest.raises(DownloadError) as ei:
        dl.fetch_raw_dataset("Toy", dest, base_url=base, files=hashes, progress=False, retries=1)
    first = len(full) // 2
    second = first + (len(full) - first) // 2  # the retry asked for the rest and got half of it
    msg = str(ei.value)
    assert one_line(msg) and f"could not fetch {USERS} of Toy" in msg
    assert f"{second:,} bytes kept in {part.name}, the next run resumes" in msg
    assert not (dest / USERS).exists()  # nothing unverified under the final name
    assert part.read_bytes() == full[:second]
    assert [r for p, r in httpd.requests if p == f"/Toy/{USERS}"] == [None, f"bytes={first}-"]
    # the next run asks for the missing bytes only, appends them and checks the whole file
    before = len(httpd.requests)
    dl.fetch_raw_dataset("Toy", dest, base_url=base, files=hashes, progress=False, retries=0)
    assert (dest / USERS).read_bytes() == full
    assert [r for p, r in httpd.requests[before:] if p == f"/Toy/{USERS}"] == [f"bytes={second}-"]
    assert leftovers(dest, hashes) == []
    # a partial copy under the final name (e.g. a killed hand-made copy) is not taken as complete
    (dest / USERS).write_bytes(full[: len(full) // 2])
    httpd.cut[USERS] = 1  # and the next transfer drops once more: the retry resumes it
    before = len(httpd.requests)
    dl.fetch_raw_dataset("Toy", dest, base_url=base, files=hashes, progress=False, retries=1)
    assert (dest / USERS).read_bytes() == full
    assert [r for p, r in httpd.requests[before:] if p == f"/Toy/{USERS}"] == [None, f"bytes={first}-"]
    assert leftovers(dest, hashes) == []


def _left_part(server, tmp_path, part):
    """The Toy dataset served, and a ``.part`` of the users file left by an earlier transfer
    (``part(full_bytes)``): ``(base url, server, hashes, full bytes, destination)``."""
    base, root, httpd = server
    hashes = write_raw(root / "Toy")
    full = (root / "Toy" / USERS).read_bytes()
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / f"{USERS}.part").write_bytes(part(full))
    return base, httpd, hashes, full, dest


def test_server_ignoring_the_range_restarts_the_file_cleanly(server, tmp_path):
    base, httpd, hashes, full, dest = _left_part(server, tmp_path, lambda full: full[:100])
    httpd.ignore_range = True  # answers the range request with 200 and the whole file
    dl.fetch_raw_dataset("Toy", dest, base_url=base, files=hashes, progress=False, retries=0)
    assert (dest / USERS).read_bytes() == full  # not the 100 bytes followed by the whole file
    assert [r for p, r in httpd.requests if p == f"/Toy/{USERS}"] == ["bytes=100-"]
    assert leftovers(dest, hashes) == []


def test_resumed_file_failing_its_checksum_is_fetched_again_from_zero(server, tmp_path):
    # a .part of another version of the file
    base, httpd, hashes, full, dest = _left_part(server, tmp_path, lambda full: b"x" * 100)
    root = server[1]
    dl.fetch_raw_dataset("Toy", dest, base_url=base, files=hashes, progress=False, retries=0)
    assert (dest / USERS).read_bytes() == full
    assert [r for p, r in httpd.requests if p == f"/Toy/{USERS}"] == ["bytes=100-", None]
    # a .part that is already whole: the server answers 416, the file is checked and kept
    (dest / ITEMS).unlink()
    (dest / f"{ITEMS}.part").write_bytes((root / "Toy" / ITEMS).read_bytes())
    before = len(httpd.requests)
    dl.fetch_raw_dataset("Toy", dest, base_url=base, files=hashes, progress=False, retries=0)
    assert (dest / ITEMS).read_bytes() == (root / "Toy" / ITEMS).read_bytes()
    size = (root / "Toy" / ITEMS).stat().st_size
    assert [r for p, r in httpd.requests[before:]] == [f"bytes={size}-"]
    assert leftovers(dest, hashes) == []


def test_unknown_hash_is_accepted_logged_recorded_and_a_partial_refetched(server, tmp_path, caplog):
    base, root, httpd = server
    hashes = write_raw(root / "Toy")
    table = {USERS: hashes[USERS], ITEMS: None}  # like Office's items file
    dest = tmp_path / "raw"
    with caplog.at_level(logging.INFO, logger="recbole_iisan.download"):
        dl.fetch_raw_dataset("Toy", dest, base_url=base, files=table, progress=False)
    assert f"fetched {(root / 'Toy' / ITEMS).stat().st_size:,} bytes with sha256 {hashes[ITEMS]}" in caplog.text
    record = json.loads((dest / dl.RECORD_FILE).read_text())
    assert record[ITEMS]["sha256"] == hashes[ITEMS] and record[ITEMS]["verified"] is False
    # complete and recorded: kept
    n = len(httpd.requests)
    dl.fetch_raw_dataset("Toy", dest, base_url=base, files=table, progress=False)
    assert len(httpd.requests) == n
    # a truncated file under the final name does not match the record: fetched again
    full = (dest / ITEMS).read_bytes()
    (dest / ITEMS).write_bytes(full[:10])
    dl.fetch_raw_dataset("Toy", dest, base_url=base, files=table, progress=False)
    assert (dest / ITEMS).read_bytes() == full and len(httpd.requests) == n + 1
    # and one that was never recorded (no sources.json) is not trusted either
    (dest / dl.RECORD_FILE).unlink()
    (dest / ITEMS).write_bytes(full[:10])
    dl.fetch_raw_dataset("Toy", dest, base_url=base, files=table, progress=False)
    assert (dest / ITEMS).read_bytes() == full


def test_offline_is_one_line_naming_file_source_and_raw_dir(tmp_path):
    url = closed_port_url()
    with pytest.raises(DownloadError) as ei:
        dl.fetch_raw_dataset("Toy", tmp_path / "raw", base_url=url,
                             files={USERS: None, ITEMS: None}, progress=False, retries=0)
    msg = str(ei.value)
    assert one_line(msg)
    assert msg.startswith(f"could not fetch {USERS} of Toy from {url}/Toy/{USERS} (cannot connect")
    assert f"get {USERS} and {ITEMS} by hand and pass --raw_dir=" in msg
    assert not (tmp_path / "raw" / USERS).exists()


def test_local_folder_is_copied_and_verified_like_a_download(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    hashes = write_raw(src / "Toy")
    for base in (str(src), str(src / "Toy"), f"file://{src}"):
        dest = tmp_path / "raw" / str(abs(hash(base)))
        monkeypatch.setenv(dl.ENV_URL, base)
        dl.fetch_raw_dataset("Toy", dest, files=hashes, progress=False)
        assert all((dest / n).read_bytes() == (src / "Toy" / n).read_bytes() for n in hashes)
        assert leftovers(dest, hashes) == []
    bad = dict(hashes, **{ITEMS: "0" * 64})
    monkeypatch.setenv(dl.ENV_URL, str(src))
    with pytest.raises(DownloadError, match="failed its checksum"):
        dl.fetch_raw_dataset("Toy", tmp_path / "raw2", files=bad, progress=False, retries=0)
    assert not (tmp_path / "raw2" / ITEMS).exists()
    with pytest.raises(DownloadError, match=r"\(file not found\)"):
        dl.fetch_raw_dataset("Toy", tmp_path / "raw3", base_url=str(tmp_path / "nowhere"),
                             files=hashes, progress=False)


# --------------------------------------------------------------------------------------------
# wiring: prepare, build_cache and a run fetch a known dataset that is missing
# --------------------------------------------------------------------------------------------
def test_prepare_without_raw_dir_downloads_then_prepares(toy_registry, tmp_path, capsys, monkeypatch):
    from recbole_iisan.prepare import main as prepare_main

    base, root, httpd, hashes = toy_registry
    data = tmp_path / "d"
    assert prepare_main(["--dataset", "Toy", "--data_path", str(data), "--paper_protocol"]) == 0
    raw = data / "Toy" / "raw"
    assert all((raw / n).is_file() for n in hashes)
    man = json.loads((data / "Toy" / "Toy.prepare.json").read_text())
    assert man["options"]["paper_protocol"] is True
    assert man["counts"]["truncated_users"] > 0  # the same truncation as prepare --paper_protocol
    inter = (data / "Toy" / "Toy.inter").read_text().splitlines()[1:]
    per_user = {}
    for line in inter:
        per_user[line.split("\t")[0]] = per_user.get(line.split("\t")[0], 0) + 1
    assert max(per_user.values()) == 13
    # again: the raw files beside the dataset are used, nothing is downloaded
    n = len(httpd.requests)
    assert prepare_main(["--dataset", "Toy", "--data_path", str(data), "--paper_protocol"]) == 0
    assert len(httpd.requests) == n
    # offline, for a dataset not yet there: one line, exit 2
    monkeypatch.setattr(dl, "RETRIES", 0)
    monkeypatch.setenv(dl.ENV_URL, closed_port_url())
    capsys.readouterr()
    assert prepare_main(["--dataset", "Toy", "--data_path", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not fetch" in err and "--raw_dir" in err


def test_download_cli_one_line_error_offline(monkeypatch, tmp_path, capsys):
    from recbole_iisan.download import main as download_main

    monkeypatch.setattr(dl, "RETRIES", 0)
    monkeypatch.setenv(dl.ENV_URL, closed_port_url())
    assert download_main(["--dataset", "Instrument", "--data_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not fetch Musical_Instruments_items.tsv of Instrument from "
                          "http://127.0.0.1:") and err.count("\n") == 1


def test_run_downloads_a_known_dataset_with_the_run_protocol(toy_registry, tmp_path, monkeypatch):
    from recbole_iisan.quick_start import cli

    base, root, httpd, hashes = toy_registry
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    code = cli.main(["--model=SASRec", "--dataset=Toy", f"--data_path={tmp_path / 'd'}",
                     f"--result_file={out}", "--epochs=1", "--hidden_size=16", "--inner_size=32",
                     "--n_layers=1", "--n_heads=1", f"--checkpoint_dir={tmp_path / 'saved'}"])
    assert code == 0
    man = json.loads((tmp_path / "d" / "Toy" / "Toy.prepare.json").read_text())
    # a run prepares with RecBole's protocol (all interactions); paper_protocol truncates at load
    assert man["options"]["paper_protocol"] is False and man["counts"]["truncated_users"] == 0
    assert man["sources"]["users"]["path"] == str((tmp_path / "d" / "Toy" / "raw" / USERS).resolve())
    result = json.loads(out.read_text())
    assert set(result["test_result"]) == {"hit@10", "ndcg@10"}


def test_build_cache_downloads_a_known_dataset(toy_registry, tmp_path, capsys):
    from recbole_iisan import build_cache
    from test_encoders import make_tiny_bert

    bert = make_tiny_bert(tmp_path / "bert")
    argv = ["--dataset", "Toy", "--data_path", str(tmp_path / "d"), "--towers=[text, text2]",
            f"--text_encoder={bert}", f"--text2_encoder={bert}", f"--cache_dir={tmp_path / 'c'}"]
    assert build_cache.main(argv) == 0
    assert (tmp_path / "d" / "Toy" / "Toy.item").is_file()
    assert "text\t" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# images: gdown (a URL override for tests), byte-range resume, import into the LMDB store
# --------------------------------------------------------------------------------------------
def image_zip(path: Path, tokens, size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, tok in enumerate(tokens):
            img = io.BytesIO()
            Image.new("RGB", (size, size), (i * 7 % 256, 40, 90)).save(img, format="JPEG")
            zf.writestr(f"am_image_toy/{tok}.jpg", img.getvalue())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_images_are_fetched_with_gdown_resumed_and_imported(toy_registry, tmp_path, caplog):
    from recbole_iisan.data.images import ImageStore
    from recbole_iisan.download import main as download_main

    base, root, httpd, hashes = toy_registry
    data = image_zip(root / "Toy" / "am_image_toy.zip", [f"I{i}" for i in range(30)])
    raw = tmp_path / "d" / "Toy" / "raw"
    raw.mkdir(parents=True)
    # an earlier, interrupted gdown download: its .part file holds the first 1000 bytes
    (raw / "am_image_toy.zipABCDEFGH.part").write_bytes(data[:1000])
    with caplog.at_level(logging.INFO, logger="recbole_iisan.download"):
        assert download_main(["--dataset", "Toy", "--data_path", str(tmp_path / "d"), "--images"]) == 0
    assert ("/Toy/am_image_toy.zip", "bytes=1000-") in httpd.requests  # resumed, not restarted
    assert (raw / "am_image_toy.zip").read_bytes() == data
    assert not list(raw.glob("*.part"))
    sha = hashlib.sha256(data).hexdigest()
    assert f"sha256 {sha}" in caplog.text
    assert json.loads((raw / dl.RECORD_FILE).read_text())["am_image_toy.zip"]["sha256"] == sha
    store = ImageStore(tmp_path / "d" / "Toy" / "Toy_images.lmdb")
    items = (tmp_path / "d" / "Toy" / "Toy.item").read_text().splitlines()[1:]
    assert len(store) == len(items) and store.get_image(items[0].split("\t")[0]).size == (8, 8)


def test_images_without_override_call_gdown_with_the_drive_id(monkeypatch, tmp_path):
    """The real path (no network here): gdown.download(id=<the authors' file id>, resume=True)."""
    import gdown

    calls = []

    def fake_download(**kw):
        calls.append(kw)
        image_zip(Path(kw["output"]), ["I0"])
        return kw["output"]

    monkeypatch.delenv(dl.ENV_URL, raising=False)
    monkeypatch.setattr(gdown, "download", fake_download)
    path = dl.fetch_images("Scientific", tmp_path)
    assert path == tmp_path / "am_image_is.zip"
    assert calls[0]["id"] == "1vXLls-2DvvkMfgiCv3nB8C29nu0NDdt3" and calls[0]["resume"] is True


def test_images_offline_is_one_line(toy_registry, tmp_path, monkeypatch):
    monkeypatch.setenv(dl.ENV_URL, closed_port_url())
    with pytest.raises(DownloadError) as ei:
        dl.fetch_images("Toy", tmp_path)
    msg = str(ei.value)
    assert one_line(msg) and msg.startswith("could not fetch am_image_toy.zip of Toy from http://127.0.0.1:")
    assert "drive.google.com/file/d/drive-id-of-toy" in msg and "--images=<zip>" in msg


def test_run_offline_ends_in_one_line(monkeypatch, tmp_path, capsys):
    from recbole_iisan.quick_start import cli

    monkeypatch.setattr(dl, "RETRIES", 0)
    monkeypatch.setenv(dl.ENV_URL, closed_port_url())
    monkeypatch.chdir(tmp_path)
    code = cli.main(["--model=SASRec", "--dataset=Instrument", f"--data_path={tmp_path / 'd'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: could not fetch Musical_Instruments_items.tsv of Instrument from http://")
    assert "--raw_dir=" in err
    assert not list((tmp_path / "d" / "Instrument" / "raw").glob("*.tsv"))
