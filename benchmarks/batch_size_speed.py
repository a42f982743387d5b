"""Seconds per training epoch against the batch size, for SASRec and IISANVS under both protocols.

    OMP_NUM_THREADS=1 python benchmarks/batch_size_speed.py [--dataset=Scientific]
        [--batch_sizes=64,128,256,512] [--models=SASRec,IISANVS] [--protocols=recbole,paper]
        [--out=results/speed] [--key=value ...]

Each (protocol, batch size, model) is one run of one epoch in a fresh process through the plugin's
normal path (``benchmarks/train_speed.py``'s ``_run``: same split, evaluator and caches; the caches
must exist, pass ``--cache_rebuild=never`` to be sure nothing is rebuilt). ``recbole``: RecBole's
protocol (every prefix of a user's training sequence is a sample); ``paper``: ``--paper_protocol``
(one window of the last 10 items per user, the loss on every position). Reports training-only wall
and CPU seconds per epoch (``time.process_time`` of the run's process), the number of training
samples, and the ratio of each to the same model and protocol at the largest batch size. Writes
``<out>/batch_size.md`` and ``<out>/batch_size.csv``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_speed import _run  # noqa: E402


def one(model: str, dataset: str, protocol: str, batch: int, extra: dict) -> dict:
    cfg = {"epochs": 1, "stopping_step": 10**6, "show_progress": False, "train_batch_size": batch,
           "paper_protocol": protocol == "paper"}
    cfg.update(extra)
    r = _run(model, dataset, cfg, bf16_eval=False)
    r.update(model=model, protocol=protocol, batch=batch)
    return r


def rows_of(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        if "error" in r:
            rows.append({"model": r["model"], "protocol": r["protocol"], "batch": r["batch"],
                         "train s/epoch": "failed: " + r["error"][:80]})
            continue
        ref = max((b for b in runs if b["model"] == r["model"] and b["protocol"] == r["protocol"] and "error" not in b),
                  key=lambda b: b["batch"])
        rows.append({
            "model": r["model"], "protocol": r["protocol"], "batch": r["batch"],
            "train s/epoch (wall)": f"{r['train_seconds_per_epoch']:.1f}",
            "train CPU s/epoch": f"{r['train_cpu_seconds_per_epoch']:.1f}",
            f"CPU x batch {ref['batch']}": f"{r['train_cpu_seconds_per_epoch'] / ref['train_cpu_seconds_per_epoch']:.2f}",
            "eval CPU s/pass": f"{r['eval_cpu_seconds_per_pass']:.1f}",
            "test ndcg@10 after 1 epoch": f"{(r.get('test_result') or {}).get('ndcg@10', float('nan')):.4f}",
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="Scientific")
    p.add_argument("--models", default="SASRec,IISANVS")
    p.add_argument("--batch_sizes", default="64,128,256,512")
    p.add_argument("--protocols", default="recbole,paper")
    p.add_argument("--out", default=str(REPO / "results" / "speed"))
    args, rest = p.parse_known_args()
    from recbole_iisan.config.configurator import parse_overrides
    from recbole_iisan.utils.files import atomic_write_text
    from recbole_iisan.utils.tables import markdown_table, write_csv

    extra = parse_overrides(rest)
    runs = []
    for protocol in args.protocols.split(","):
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            for model in args.models.split(","):
                runs.append(one(model, args.dataset, protocol, batch, extra))
                r = runs[-1]
                print(f"{model} {protocol} {batch}: " + (r.get("error") or
                      f"{r['train_seconds_per_epoch']:.1f} s, {r['train_cpu_seconds_per_epoch']:.1f} CPU s"), flush=True)
    rows = rows_of(runs)
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    cmd = "OMP_NUM_THREADS=1 python benchmarks/batch_size_speed.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()
    text = (f"# Seconds per training epoch by batch size ({args.dataset}, one epoch per run)\n\nCommand:\n\n    {cmd}\n\n"
            f"Load average at the end {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores (wall seconds vary "
            "with it; CPU seconds are the comparable figures).\n\n" + markdown_table(rows, cols) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "batch_size.md", text)
    write_csv(out / "batch_size.csv", rows, cols)
    print(text)


if __name__ == "__main__":
    main()
