"""What IISAN costs as the catalogue grows: 20k, 100k, 300k and 1M items on one machine.

    OMP_NUM_THREADS=1 python benchmarks/scale.py [--sizes=20000,100000,300000,1000000]
        [--out=results/scale] [--work=DIR] [--users=2000] [--rows=4] [--dim=384]
        [--storages=memory,mmap] [--eval_batch_size=256] [--chunk_items=65536] [--keep] [--work=DIR]

Per size, a synthetic catalogue: ``--users`` users whose sequences (5 + geometric(1/6) items,
at most 50) draw items with a Zipf(1) popularity over a random permutation of the catalogue;
every item of the catalogue is in the ``.item`` file, so RecBole's item count is the size.
Two towers of random frozen states (``--rows`` x ``--dim``, float16; the default is MiniLM-L6's
shape under the default layer scheme: hidden states 0, 2, 4, 6 of 384 dims) are written through
the LMDB cache writer of ``recbole_iisan.data.cache`` and read back by ``load_states``.

Every phase runs in a fresh subprocess and reports its own peak resident memory (``VmHWM`` of
``/proc/self/status``, reset with ``/proc/self/clear_refs`` between the phases of one process):

* ``build``: cache write items/s, bytes per item (allocated bytes of ``data.mdb`` per item and
  tower), the ``.npy`` export for ``state_storage: mmap``.
* ``legacy``: today's dataset path: ``load_states`` of all items + the padded copy.
* ``IISANVS/<storage>``: states loaded through ``recbole_iisan.data.cache.storage`` (seconds, RSS),
  a real RecBole dataset, IISANVS and RecBole's ``Trainer`` (PluginTrainer): one training epoch
  (seconds per 1,000 training sequences), the item table (once per evaluation), RecBole's
  full-sort test evaluation (``--eval_batch_size`` users per batch) and the streaming top-k
  evaluation of ``recbole_iisan.evaluator.ranking`` (``--chunk_items``), whose metrics must equal RecBole's.
* ``SASRec``: RecBole's SASRec on the same dataset and split, same measures.

Results: ``<out>/scale.csv`` (one row per size and phase), ``<out>/scale.png`` (log-log) and the
markdown table, on stdout and in ``<out>/scale.md`` (which ``results/scale/README.md`` includes). A phase that fails or is killed (out of memory) is recorded with its
exit code and the others go on.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOWERS = ("text", "text2")
RESULT_PREFIX = "SCALE_RESULT "


# ------------------------------------------------------------------------------------------ memory

def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def gb(x: float) -> float:
    return round(x / 2**30, 3)


# ------------------------------------------------------------------------------------------ data

def dataset_name(n_items: int) -> str:
    return f"synth-{n_items}"


def write_dataset(root: Path, n_items: int, n_users: int, seed: int = 0) -> Path:
    """RecBole atomic files with Zipf(1) item popularity; returns the dataset folder."""
    import numpy as np

    name = dataset_name(n_items)
    folder = root / name
    if (folder / f"{name}.inter").is_file() and (folder / f"{name}.item").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    p = 1.0 / ranks
    p /= p.sum()
    perm = rng.permutation(n_items)  # which item has which popularity rank
    lengths = 5 + np.minimum(rng.geometric(1 / 6, size=n_users) - 1, 45)
    items = perm[rng.choice(n_items, size=int(lengths.sum()), p=p)]
    users = np.repeat(np.arange(n_users), lengths)
    ts = np.concatenate([np.arange(n) for n in lengths])
    buf = io.StringIO()
    buf.write("user_id:token\titem_id:token\ttimestamp:float\n")
    buf.writelines(f"u{u}\ti{i}\t{t}\n" for u, i, t in zip(users.tolist(), items.tolist(), ts.tolist()))
    from recbole_iisan.utils.files import atomic_write_text

    atomic_write_text(folder / f"{name}.inter", buf.getvalue())
    atomic_write_text(folder / f"{name}.item", "item_id:token\n" + "".join(f"i{j}\n" for j in range(n_items)))
    return folder


def item_tokens(n_items: int) -> list[str]:
    return [f"i{j}" for j in range(n_items)]


def synthetic_identity(tower: str, n_items: int, rows: int, dim: int, seed: int) -> dict:
    """What identifies a synthetic cache (the cache's digest covers it, as for a real one)."""
    from recbole_iisan.data.cache.layout import FORMAT_VERSION

    return {"format": FORMAT_VERSION, "synthetic": True, "tower": tower, "items": n_items,
            "n_layers": 2 * rows - 2, "dim": dim, "dtype": "float16", "seed": seed}


def write_cache(folder: Path, tokens: list[str], rows: int, dim: int, seed: int, batch: int = 4096) -> dict:
    """Random float16 states written in the cache's own format (``data/cache/layout.py``: one LMDB
    transaction per batch, a crc32 after every value, the store record and the completion marker),
    so ``load_states`` verifies and reads them like a real cache; returns timings."""
    import torch

    from recbole_iisan.data.cache import layout
    from recbole_iisan.data.cache.integrity import lmdb_header
    from recbole_iisan.utils.files import atomic_write_json, atomic_write_text

    if layout.is_complete(folder):
        return {"reused": True}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    layers = list(range(0, 2 * rows, 2))
    ident = synthetic_identity(folder.name.split("-")[0], len(tokens), rows, dim, seed)
    manifest = {"tower": folder.name, "encoder": "synthetic", "layers": layers, "dim": dim, "dtype": "float16",
                "n_layers": 2 * rows - 2, "item_count": len(tokens), "dataset_items": len(tokens),
                "identity": ident, "complete": False}
    atomic_write_json(folder / layout.MANIFEST, manifest)
    crc_seed = layout.crc_seed(layout.folder_digest(folder), layers)
    value_bytes = rows * dim * 2 + layout.CRC_BYTES
    env = layout.open_env(folder, int(len(tokens) * (-(-(value_bytes + 64) // 4096) + 1) * 4096 * 1.2) + 2**26)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    try:
        for s in range(0, len(tokens), batch):
            part = tokens[s:s + batch]
            states = torch.randn((len(part), rows, dim), generator=gen)
            layout.put_batch(env, [t.encode("utf-8") for t in part], layout.to_bytes(states, "float16"), crc_seed)
        env.sync(True)
    finally:
        env.close()
    seconds = time.perf_counter() - t0
    head = lmdb_header(folder)
    manifest.update(complete=True, build_seconds=round(seconds, 3),
                    store={"data_bytes": head["size"], "entries": head["entries"], "value_bytes": value_bytes})
    atomic_write_json(folder / layout.MANIFEST, manifest)
    atomic_write_text(folder / layout.COMPLETE, "synthetic\n")
    return {"seconds": seconds}


def allocated_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if p.is_file() and p.suffix != ".npy")


# ------------------------------------------------------------------------------------------ phases

def phase_build(a: argparse.Namespace) -> dict:
    import torch

    from recbole_iisan.data.cache import storage as state_store

    n = a.size
    data_root = Path(a.work) / "data"
    t0 = time.perf_counter()
    write_dataset(data_root, n, a.users)
    data_s = time.perf_counter() - t0
    tokens = item_tokens(n)
    out = {"dataset_write_s": round(data_s, 2)}
    build_s = 0.0
    nbytes = 0
    for k, tower in enumerate(TOWERS):
        folder = cache_folder(a, tower)
        r = write_cache(folder, tokens, a.rows, a.dim, seed=1000 * k + n)
        build_s += r.get("seconds", float("nan"))
        nbytes += allocated_bytes(folder)
    out["cache_build_items_per_s"] = round(len(TOWERS) * n / build_s, 1) if build_s == build_s else None
    out["cache_bytes_per_item"] = round(nbytes / n / len(TOWERS), 1)
    out["state_bytes_per_item"] = a.rows * a.dim * 2
    if "mmap" in a.storages:
        t0 = time.perf_counter()
        for tower in TOWERS:
            state_store.export_states(cache_folder(a, tower), tokens_in_id_order(a, n), layers(a), torch.float16)
        out["mmap_export_s"] = round(time.perf_counter() - t0, 2)
    return out


def cache_folder(a: argparse.Namespace, tower: str) -> Path:
    """``<work>/cache/<tower>-synthetic-<digest>``: the digest of its identity, as a real cache's."""
    from recbole_iisan.data.cache.identity import digest

    ident = synthetic_identity(tower, a.size, a.rows, a.dim, 1000 * TOWERS.index(tower) + a.size)
    return Path(a.work) / "cache" / f"{tower}-synthetic-{digest(ident)}"


def layers(a: argparse.Namespace) -> list[int]:
    return list(range(0, 2 * a.rows, 2))


def tokens_in_id_order(a: argparse.Namespace, n: int) -> list[str]:
    """RecBole's internal item-id order for the synthetic dataset (token remap is by first
    appearance: .inter first, then the remaining .item tokens); computed by building the dataset
    once and stored next to the data."""
    path = Path(a.work) / "data" / dataset_name(n) / "id_order.txt"
    if path.is_file():
        return path.read_text().split("\n")
    config = make_config(a, "SASRec")
    from recbole_iisan.data.dataset import ProtocolSequentialDataset

    ds = ProtocolSequentialDataset(config)
    toks = [str(t) for t in ds.field2id_token[ds.iid_field][1:]]
    from recbole_iisan.utils.files import atomic_write_text

    atomic_write_text(path, "\n".join(toks))
    return toks


def make_config(a: argparse.Namespace, model: str):
    from recbole_iisan.config.configurator import build_config

    cd = {
        "data_path": str(Path(a.work) / "data"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
        "towers": list(TOWERS),
        "text_encoder": "synthetic", "text2_encoder": "synthetic",
        "text_fields": ["item_id"], "text2_fields": ["item_id"],
        "epochs": 1, "eval_batch_size": a.eval_batch_size, "train_batch_size": a.train_batch_size,
        "show_progress": False, "state": "WARNING", "checkpoint_dir": str(Path(a.work) / "ckpt"),
        "tower_batch_size": a.tower_batch_size, "save_dataset": False, "save_dataloaders": False,
        # the side network's cost only: an ID table would add n_items x embedding_size parameters
        "item_id_embedding": False,
    }
    return build_config(model, dataset_name(a.size), config_dict=cd)


def phase_legacy(a: argparse.Namespace) -> dict:
    """Today's MultimodalSequentialDataset path: load_states of all items, then a padded copy."""
    import torch

    from recbole_iisan.data import cache as cache_mod

    tokens = tokens_in_id_order(a, a.size)
    reset_peak()
    before = proc_status()
    t0 = time.perf_counter()
    held = []
    for tower in TOWERS:
        states, missing = cache_mod.load_states(cache_folder(a, tower), tokens, layers(a), dtype=torch.float16)
        full = torch.zeros((len(tokens) + 1,) + tuple(states.shape[1:]), dtype=states.dtype)
        full[1:] = states
        del states
        held.append(full)
    s = time.perf_counter() - t0
    st = proc_status()
    return {"load_s": round(s, 2), "load_rss_gb": gb(st["VmRSS"] - before["VmRSS"]),
            "load_peak_gb": gb(st["VmHWM"])}


def _bench_dataset_class(a: argparse.Namespace, storage: str):
    """A real RecBole dataset (the plugin's ProtocolSequentialDataset) that serves the synthetic
    states as MultimodalSequentialDataset does, held as ``storage`` by ``state_store``."""
    import torch

    from recbole_iisan.data.cache import storage as state_store
    from recbole_iisan.data.dataset import ProtocolSequentialDataset

    class SyntheticStatesDataset(ProtocolSequentialDataset):
        def __init__(self, config):
            super().__init__(config)
            tokens = [str(t) for t in self.field2id_token[self.iid_field][1:]]
            self.towers = list(TOWERS)
            self.item_states, self.item_state_layers, self.encoder_depths, self.missing_items = {}, {}, {}, {}
            reset_peak()
            before = proc_status()
            t0 = time.perf_counter()
            for tower in TOWERS:
                st, missing = state_store.load_item_states(cache_folder(a, tower), tokens, layers(a),
                                                           torch.float16, storage)
                assert not missing
                self.item_states[tower] = st
                self.item_state_layers[tower] = layers(a)
                self.encoder_depths[tower] = 2 * a.rows - 2
                self.missing_items[tower] = 0
            after = proc_status()
            self.load_stats = {"load_s": round(time.perf_counter() - t0, 2),
                               "load_rss_gb": gb(after["VmRSS"] - before["VmRSS"]),
                               "load_anon_gb": gb(after["RssAnon"] - before["RssAnon"]),
                               "load_peak_gb": gb(after["VmHWM"]),
                               "memory_mapped": state_store.is_memory_mapped(self.item_states[TOWERS[0]])}

    return SyntheticStatesDataset


def phase_model(a: argparse.Namespace) -> dict:
    import torch
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    import recbole_iisan  # noqa: F401
    from recbole_iisan.config.configurator import get_model_class
    from recbole_iisan.data.dataset import ProtocolSequentialDataset
    from recbole_iisan.trainer.trainer import PluginTrainer
    from recbole_iisan.evaluator.ranking import evaluate_full_sort_streaming

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model_name = a.model
    tokens_in_id_order(a, a.size)  # (built by the build phase; cheap here)
    config = make_config(a, model_name)
    init_seed(config["seed"], config["reproducibility"])
    out: dict = {}
    if model_name == "SASRec":
        ds = ProtocolSequentialDataset(config)
    else:
        ds = _bench_dataset_class(a, a.storage)(config)
        out.update(ds.load_stats)
    train_data, valid_data, test_data = data_preparation(config, ds)
    model = get_model_class(model_name)(config, train_data._dataset).to(config["device"])
    trainer = PluginTrainer(config, model)
    n_train = len(train_data._dataset)
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer._train_epoch(train_data, 0)
    train_s, train_c = time.perf_counter() - t0, time.process_time() - c0
    out.update({"n_items": ds.item_num - 1, "train_sequences": n_train, "train_s": round(train_s, 2),
                "train_s_per_1k_seq": round(train_s / (n_train / 1000), 3),
                "train_cpu_s_per_1k_seq": round(train_c / (n_train / 1000), 3),
                "train_peak_gb": gb(proc_status()["VmHWM"])})
    model.eval()
    with torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        if hasattr(model, "item_table"):
            model.invalidate_item_table()
            model.item_table()
            # the parameters do not change from here on: both evaluations below reuse this table
            # (RecBole's evaluate calls model.eval(), which would drop it), so they time scoring only
            model.invalidate_item_table = lambda: None
        out["item_table_s"] = round(time.perf_counter() - t0, 2)
        out["item_table_cpu_s"] = round(time.process_time() - c0, 2)
        reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        rb = trainer.evaluate(test_data, load_best_model=False)
        rb_s, rb_c = time.perf_counter() - t0, time.process_time() - c0
        rb_peak = proc_status()["VmHWM"]
        reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        st = evaluate_full_sort_streaming(trainer, test_data, chunk_items=a.chunk_items)
        st_s, st_c = time.perf_counter() - t0, time.process_time() - c0
        st_peak = proc_status()["VmHWM"]
    n_users = len(test_data._dataset)
    out.update({
        "eval_users": n_users,
        "eval_s_per_1k_users": round(rb_s / (n_users / 1000), 3),
        "eval_peak_gb": gb(rb_peak),
        "stream_eval_s_per_1k_users": round(st_s / (n_users / 1000), 3),
        "eval_cpu_s_per_1k_users": round(rb_c / (n_users / 1000), 3),
        "stream_eval_cpu_s_per_1k_users": round(st_c / (n_users / 1000), 3),
        "stream_eval_peak_gb": gb(st_peak),
        "ndcg@10": round(float(rb["ndcg@10"]), 6), "hit@10": round(float(rb["hit@10"]), 6),
        "stream_equal": all(abs(float(rb[k]) - float(st[k])) < 1e-9 for k in rb),
    })
    return out


# ------------------------------------------------------------------------------------------ driver

def run_child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            res = json.loads(line[len(RESULT_PREFIX):])
            res["wall_s"] = round(wall, 1)
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
    return {"error": f"{why}: {' / '.join(tail)[-300:]}", "wall_s": round(wall, 1)}


PEAK_KEYS = ("load_peak_gb", "train_peak_gb", "eval_peak_gb", "stream_eval_peak_gb", "peak_rss_gb")


def process_peak(row: dict) -> float:
    """The child's peak RSS: the largest of its phases' VmHWM (each phase resets VmHWM first)."""
    return max(float(row[k]) for k in PEAK_KEYS if row.get(k) not in (None, ""))


def child_main(a: argparse.Namespace) -> None:
    import logging

    logging.disable(logging.WARNING)
    fn = {"build": phase_build, "legacy": phase_legacy, "model": phase_model}[a.child]
    res = fn(a)
    res["peak_rss_gb"] = gb(proc_status()["VmHWM"])  # since the last reset_peak(); the max below
    res["peak_rss_gb"] = process_peak(res)
    print(RESULT_PREFIX + json.dumps(res), flush=True)


COLUMNS = ["n_items", "phase", "cache_build_items_per_s", "cache_bytes_per_item", "load_s", "load_rss_gb",
           "train_s_per_1k_seq", "x_SASRec_train", "train_cpu_s_per_1k_seq", "x_SASRec_train_cpu",
           "item_table_s", "item_table_cpu_s", "eval_s_per_1k_users", "eval_cpu_s_per_1k_users",
           "stream_eval_cpu_s_per_1k_users", "x_SASRec_eval_cpu",
           "stream_eval_s_per_1k_users", "x_SASRec_eval", "eval_peak_gb", "stream_eval_peak_gb",
           "train_peak_gb", "peak_rss_gb", "ndcg@10", "stream_equal", "wall_s", "error"]


def write_outputs(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    keys = COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS))
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    from recbole_iisan.utils.files import atomic_write_text

    atomic_write_text(out / "scale.csv", buf.getvalue())
    atomic_write_text(out / "scale.md", markdown(rows) + "\n")  # the table the README includes
    try:
        plot(rows, out / "scale.png")
    except Exception as exc:  # noqa: BLE001  (the CSV is the result; the plot is a view of it)
        print(f"plot failed: {exc}", file=sys.stderr)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train_cpu_s_per_1k_seq", "training CPU s / 1,000 sequences"),
              ("eval_cpu_s_per_1k_users", "full-ranking eval CPU s / 1,000 users\n(RecBole; x: streaming top-k)"),
              ("item_table_cpu_s", "item table CPU s (once per evaluation)"),
              ("load_s", "state load s"), ("peak_rss_gb", "peak RSS (VmHWM) GB")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    phases = sorted({r["phase"] for r in rows})
    for ax, (key, title) in zip(axes, panels):
        for ph in phases:
            pts = [(r["n_items"], float(r[key])) for r in rows
                   if r["phase"] == ph and r.get(key) not in (None, "") and float(r[key]) > 0]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=ph)
        if key == "eval_cpu_s_per_1k_users":
            for ph in ("IISANVS/memory", "SASRec"):
                pts = [(r["n_items"], float(r["stream_eval_cpu_s_per_1k_users"])) for r in rows
                       if r["phase"] == ph and r.get("stream_eval_cpu_s_per_1k_users") not in (None, "")]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, marker="x", linestyle="--", label=f"{ph} streaming top-k")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def markdown(rows: list[dict]) -> str:
    cols = ["n_items", "phase", "cache_bytes_per_item", "cache_build_items_per_s", "load_s", "load_rss_gb",
            "train_s_per_1k_seq", "train_cpu_s_per_1k_seq", "x_SASRec_train_cpu", "item_table_cpu_s",
            "eval_s_per_1k_users", "eval_cpu_s_per_1k_users", "stream_eval_cpu_s_per_1k_users",
            "x_SASRec_eval_cpu", "eval_peak_gb", "stream_eval_peak_gb", "peak_rss_gb", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="20000,100000,300000,1000000")
    p.add_argument("--out", default=str(REPO / "results" / "scale"))
    p.add_argument("--work", default=None, help="data + caches (default $TMPDIR/recbole_iisan_scale; 2 towers x ~7 KB per item)")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--storages", default="memory,mmap")
    p.add_argument("--models", default="IISANVS,SASRec")
    p.add_argument("--eval_batch_size", type=int, default=256)
    p.add_argument("--train_batch_size", type=int, default=512)
    p.add_argument("--tower_batch_size", type=int, default=4096)
    p.add_argument("--chunk_items", type=int, default=65536)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--keep", action="store_true", help="keep the caches of each size (default: delete after)")
    p.add_argument("--report", action="store_true", help="only rewrite the table, CSV and plot from <out>/scale.csv")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--storage", default="memory", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.storages = [s for s in a.storages.split(",") if s]
    a.work = a.work or str(Path(tempfile.gettempdir()) / "recbole_iisan_scale")
    if a.child:
        child_main(a)
        return
    out = Path(a.out)
    csv_path = out / "scale.csv"
    rows: list[dict] = []
    common = [f"--work={a.work}", f"--users={a.users}", f"--rows={a.rows}", f"--dim={a.dim}",
              f"--storages={','.join(a.storages)}", f"--eval_batch_size={a.eval_batch_size}",
              f"--train_batch_size={a.train_batch_size}", f"--tower_batch_size={a.tower_batch_size}",
              f"--chunk_items={a.chunk_items}"]
    if csv_path.is_file():  # resume: sizes already measured are kept
        with open(csv_path) as f:
            rows = [dict(r, n_items=int(r["n_items"])) for r in csv.DictReader(f)]
    if a.report:
        rows = _with_ratios(rows)
        write_outputs(rows, out)
        print(markdown(rows))
        return
    done = {(r["n_items"], r["phase"]) for r in rows if not r.get("error")}
    rows = [r for r in rows if (r["n_items"], r["phase"]) in done]
    for n in [int(s) for s in a.sizes.split(",") if s]:
        phases = [("build", ["--child=build"]), ("legacy", ["--child=legacy"])]
        for m in a.models.split(","):
            if m == "SASRec":
                phases.append(("SASRec", ["--child=model", "--model=SASRec"]))
            else:
                phases += [(f"{m}/{s}", ["--child=model", f"--model={m}", f"--storage={s}"]) for s in a.storages]
        for phase, extra in phases:
            if (n, phase) in done:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {n:,} items: {phase} ...", flush=True)
            res = run_child(extra + [f"--size={n}"] + common, a.timeout)
            row = {"n_items": n, "phase": phase, **res}
            print(f"    {json.dumps(res)}", flush=True)
            rows.append(row)
            if phase == "build" and "error" in res:
                break
            write_outputs(_with_ratios(rows), out)
        if not a.keep:
            shutil.rmtree(Path(a.work) / "cache", ignore_errors=True)
    rows = _with_ratios(rows)
    write_outputs(rows, out)
    print(f"\n{markdown(rows)}\n\nwritten to {csv_path} and {out / 'scale.png'}")


def _with_ratios(rows: list[dict]) -> list[dict]:
    for r in rows:
        if not r.get("error") and any(r.get(k) not in (None, "") for k in PEAK_KEYS):
            r["peak_rss_gb"] = process_peak(r)
    sas = {r["n_items"]: r for r in rows if r["phase"] == "SASRec" and not r.get("error")}
    for r in rows:
        b = sas.get(r["n_items"])
        if b and r["phase"] != "SASRec" and r.get("train_s_per_1k_seq") not in (None, ""):
            r["x_SASRec_train"] = round(float(r["train_s_per_1k_seq"]) / float(b["train_s_per_1k_seq"]), 2)
            r["x_SASRec_eval"] = round(float(r["eval_s_per_1k_users"]) / float(b["eval_s_per_1k_users"]), 2)
            if r.get("train_cpu_s_per_1k_seq") not in (None, "") and b.get("train_cpu_s_per_1k_seq") not in (None, ""):
                r["x_SASRec_train_cpu"] = round(float(r["train_cpu_s_per_1k_seq"]) / float(b["train_cpu_s_per_1k_seq"]), 2)
                r["x_SASRec_eval_cpu"] = round(float(r["eval_cpu_s_per_1k_users"]) / float(b["eval_cpu_s_per_1k_users"]), 2)
    return rows


if __name__ == "__main__":
    main()
