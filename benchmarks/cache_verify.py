"""Cost of the cache's integrity checks on load.

    OMP_NUM_THREADS=1 python benchmarks/cache_verify.py [--n_items 20000] [--rows 7] [--dim 384] [--repeat 5]

Writes a cache folder of random fp16 states (``n_items`` x ``rows`` x ``dim``) through the cache's
own writer (one transaction per 64 items, per-value crc32, manifest with the store record), then
times, best of ``repeat`` runs (the file in the page cache):

- ``load_states(verify=False)``: the manifest, size and LMDB header checks, no checksums;
- ``load_states(verify=True)`` (the default): plus each value's crc32;
- ``verify_cache``: the full scan ``ensure_cache`` runs before reusing a cache;

and, for the choice of checksum, the bare cost of crc32 (zlib) and blake2b-64 (hashlib) over the
same values.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recbole_iisan.data import cache as cache_mod  # noqa: E402
from recbole_iisan.data.cache import layout  # noqa: E402
from recbole_iisan.data.cache.identity import digest  # noqa: E402
from recbole_iisan.data.cache.integrity import check_manifest, lmdb_header  # noqa: E402


def synthetic_cache(root: Path, n_items: int, rows: int, dim: int) -> tuple[Path, list[str]]:
    ident = {"format": layout.FORMAT_VERSION, "tower_kind": "text", "weights_fingerprint": "bench",
             "model_type": "bert", "n_layers": rows - 1, "dim": dim, "pooling": "cls",
             "dataset_fingerprint": f"random {n_items}", "dtype": "float16", "encoder_dtype": "float32",
             "max_length": 30, "fields": ["title"]}
    folder = root / f"text-bench-{digest(ident)}"
    folder.mkdir(parents=True)
    layers = list(range(rows))
    tokens = [f"item{i:07d}" for i in range(n_items)]
    man = {k: ident[k] for k in ("weights_fingerprint", "model_type", "n_layers", "dim", "pooling",
                                 "dataset_fingerprint", "dtype", "encoder_dtype", "max_length", "fields")}
    man.update(identity=ident, layers=layers, item_count=n_items, complete=False)
    value_bytes, seed = check_manifest(folder, man)
    env = layout.open_env(folder, int(n_items * (value_bytes + 4096) * 1.5) + 2**26)
    rng = np.random.default_rng(0)
    for s in range(0, n_items, 64):
        arr = rng.standard_normal((min(64, n_items - s), rows, dim), dtype=np.float32).astype(np.float16)
        layout.put_batch(env, [t.encode() for t in tokens[s:s + 64]], arr, seed)
    env.sync(True)
    env.close()
    head = lmdb_header(folder)
    man["store"] = {"data_bytes": head["size"], "entries": head["entries"], "value_bytes": value_bytes}
    man["complete"] = True
    (folder / layout.MANIFEST).write_text(json.dumps(man))
    (folder / layout.COMPLETE).write_text("bench\n")
    return folder, tokens


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n_items", type=int, default=20000)
    ap.add_argument("--rows", type=int, default=7)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, tokens = synthetic_cache(Path(tmp), args.n_items, args.rows, args.dim)
        layers = list(range(args.rows))
        mb = (folder / "data.mdb").stat().st_size / 2**20
        print(f"{args.n_items} items x {args.rows} rows x {args.dim} fp16 "
              f"({args.rows * args.dim * 2} B per value + 4 B crc32), data.mdb {mb:.0f} MB, "
              f"{torch.get_num_threads()} torch threads, best of {args.repeat}")
        plain = best(lambda: cache_mod.load_states(folder, tokens, layers, verify=False), args.repeat)
        checked = best(lambda: cache_mod.load_states(folder, tokens, layers, verify=True), args.repeat)
        full = best(lambda: cache_mod.verify_cache(folder), args.repeat)
        values = [np.random.default_rng(1).bytes(args.rows * args.dim * 2) for _ in range(args.n_items)]
        crc = best(lambda: [zlib.crc32(v) for v in values], args.repeat)
        b2 = best(lambda: [hashlib.blake2b(v, digest_size=8).digest() for v in values], args.repeat)
    print(f"load_states verify=False : {plain * 1000:7.1f} ms")
    print(f"load_states verify=True  : {checked * 1000:7.1f} ms  (ratio {checked / plain:.2f})")
    print(f"verify_cache (full scan) : {full * 1000:7.1f} ms  (ratio to a plain load {full / plain:.2f})")
    print(f"bare crc32 over the values   : {crc * 1000:7.1f} ms ({mb / crc:.0f} MB/s)")
    print(f"bare blake2b-64 over the values: {b2 * 1000:7.1f} ms ({mb / b2:.0f} MB/s)")


if __name__ == "__main__":
    main()
