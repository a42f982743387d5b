"""Reporting: a run's peak memory, result files, comparison tables, gate values and TPME.

One module for everything a run writes or prints besides RecBole's logs:

- :func:`peak_memory`: the *calling process's own* peak memory: ``VmHWM`` from
  ``/proc/self/status`` on Linux (``ru_maxrss`` survives ``exec``: a child started by a parent at
  1.5 GB reads 1.5 GB there), plus CUDA's max allocated / reserved on a GPU;
- :func:`metric_keys` and :func:`compare_rows`: table columns from the configured ``metrics`` x
  ``topk`` (``--topk=[20]`` gives Hit@20 / NDCG@20 columns);
- :func:`markdown_table`, :func:`write_csv`, :func:`write_result`: tables and atomic,
  strict-JSON writes (``recbole_iisan.utils``);
- :func:`tpme`: the paper's efficiency score (SIGIR'24 Eqs. 6-10).
"""
from __future__ import annotations

import csv
import io
import resource
import sys
from typing import Any, Optional, Sequence

from recbole_iisan.utils import PathLike, atomic_write_json, atomic_write_text

TPME_WEIGHTS = (0.45, 0.10, 0.45)

# RecBole's metric class names -> their display names in tables
_DISPLAY = {"hit": "Hit", "ndcg": "NDCG", "mrr": "MRR", "recall": "Recall", "precision": "Precision",
            "map": "MAP", "itemcoverage": "ItemCoverage", "averagepopularity": "AveragePopularity",
            "giniindex": "GiniIndex", "shannonentropy": "ShannonEntropy", "tailpercentage": "TailPercentage"}


# --------------------------------------------------------------------------------------------
# memory

def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory(device: Any = None) -> dict[str, int]:
    """Peak memory of THIS process, in bytes: ``peak_rss`` (``VmHWM``; ``ru_maxrss`` where there is
    no ``/proc``), and on CUDA ``cuda_max_allocated`` / ``cuda_max_reserved``."""
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kib //= 1024  # bytes there
    out = {"peak_rss": int(kib) * 1024}
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        out["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated(device))
        out["cuda_max_reserved"] = int(torch.cuda.max_memory_reserved(device))
    return out


def peak_megabytes(mem: dict) -> float:
    """The figure a table shows: CUDA max allocated on a GPU, else the process peak RSS."""
    return mem.get("cuda_max_allocated", mem.get("peak_rss", 0)) / 2**20


# --------------------------------------------------------------------------------------------
# tables

def metric_keys(metrics: Sequence[str], topk: Sequence[int]) -> list[tuple[str, str]]:
    """``[(result key, column title)]`` for every configured metric and cut-off, in RecBole's
    key format (``hit@10``) and a readable title (``Hit@10``)."""
    out = []
    for m in metrics:
        for k in topk:
            out.append((f"{m.lower()}@{k}", f"{_DISPLAY.get(m.lower(), m)}@{k}"))
    return out


def compare_columns(metrics: Sequence[str], topk: Sequence[int]) -> list[str]:
    return (["model"] + [f"test {title}" for _, title in metric_keys(metrics, topk)]
            + ["trainable params", "train s/epoch", "peak memory MB", "epochs to best", "epochs run"])


def compare_rows(results: Sequence[dict], metrics: Sequence[str], topk: Sequence[int]) -> list[dict]:
    """One row per run result (see ``quick_start.run``); a failed run shows its error."""
    keys = metric_keys(metrics, topk)
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"model": r["model"], f"test {keys[0][1]}": "failed: " + str(r["error"])[:80]})
            continue
        test = r.get("test_result") or {}
        row = {"model": r["model"]}
        for key, title in keys:
            v = test.get(key)
            row[f"test {title}"] = f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"
        sec = r.get("train_seconds_per_epoch")
        row.update({
            "trainable params": f"{r['trainable_parameters']:,}",
            "train s/epoch": f"{sec:.2f}" if isinstance(sec, (int, float)) else "n/a",
            "peak memory MB": f"{peak_megabytes(r['peak_memory']):.0f}",
            "epochs to best": str(r["best_epoch"]),
            "epochs run": str(r["epochs_run"]),
        })
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(path: PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_result(path: PathLike, result: dict) -> None:
    """A run's result dict as strict JSON (no NaN / Infinity), written atomically."""
    atomic_write_json(path, result)


def format_gates(gates: dict) -> str:
    return "; ".join(f"{k}: " + ", ".join(f"{v:.3f}" for v in vals) for k, vals in gates.items())


# --------------------------------------------------------------------------------------------
# TPME

def _minmax(xs):
    lo, hi = min(xs), max(xs)
    return [0.0 if hi == lo else (x - lo) / (hi - lo) for x in xs]


def tpme(times, params, memory, weights=TPME_WEIGHTS):
    """TPME per method (SIGIR'24 Eqs. 6-10): min-max normalise each quantity over the compared
    methods, then ``0.45 t + 0.10 p + 0.45 m``. Lower is better; a quantity with no spread adds 0."""
    a1, a2, a3 = weights
    return [a1 * t + a2 * p + a3 * m for t, p, m in zip(_minmax(times), _minmax(params), _minmax(memory))]
