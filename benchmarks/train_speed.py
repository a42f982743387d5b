"""IISAN's training and evaluation speed next to RecBole's SASRec, on the same data and machine.

    python benchmarks/train_speed.py --dataset=Scientific [--models=SASRec,IISANVS,IISANVA]
        [--epochs=2] [--key=value ...]

Each model runs in a fresh process (so its peak memory is its own) through the plugin's normal
path (same split, batch size and evaluator) for ``--epochs`` epochs; the encoder caches are built
before timing starts. Prints training-only seconds per epoch, seconds per full-ranking
evaluation pass, peak memory (CUDA max allocated on GPU, process peak RSS on CPU) and each
model's ratio to the first model (the baseline).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="Scientific")
    p.add_argument("--models", default="SASRec,IISANVS,IISANVA")
    p.add_argument("--epochs", type=int, default=2)
    args, rest = p.parse_known_args()
    sys.argv = [sys.argv[0]] + rest  # RecBole's Config reads the --key=value overrides itself

    import recbole_iisan  # noqa: F401
    from recbole_iisan.cli import _run_in_subprocess, markdown_table
    from recbole_iisan.quick_start import prepare_inputs

    models = [m for m in args.models.split(",") if m]
    config_dict = {"epochs": args.epochs, "stopping_step": 10**6, "show_progress": False}
    for m in models:
        prepare_inputs(m, args.dataset, None, config_dict)
    results = [_run_in_subprocess(m, args.dataset, None, config_dict) for m in models]
    base = results[0]
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"model": r["model"], "train s/epoch": "failed: " + r["error"][:60]})
            continue
        mem = r["peak_memory"]
        peak = mem.get("cuda_max_allocated", mem["peak_rss"])
        base_peak = base["peak_memory"].get("cuda_max_allocated", base["peak_memory"]["peak_rss"])
        rows.append({
            "model": r["model"],
            "train s/epoch": f"{r['train_seconds_per_epoch']:.2f}",
            f"x {base['model']}": f"{r['train_seconds_per_epoch'] / base['train_seconds_per_epoch']:.2f}",
            "eval s/pass": f"{r['eval_seconds_per_pass']:.2f}",
            f"eval x {base['model']}": f"{r['eval_seconds_per_pass'] / base['eval_seconds_per_pass']:.2f}",
            "peak memory MB": f"{peak / 2**20:.0f}",
            f"memory x {base['model']}": f"{peak / base_peak:.2f}",
            "trainable params": f"{r['trainable_parameters']:,}",
        })
    cols = list(rows[0].keys()) if rows else []
    for r in rows:
        cols += [c for c in r if c not in cols]
    print(f"\n{args.dataset}: {args.epochs} epoch(s) per model, device {base.get('device', '?')}")
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
