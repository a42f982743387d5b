"""A run's result files and the comparison table of a folder of them.

    python -m recbole_iisan.report DIR [--baseline=MODEL] [--csv=PATH]
    python -m recbole_iisan.report --docs README.md docs/*.md

prints the markdown table of a folder of result files (one ``<Model>-seed<seed>.json`` per run and
its ``.users.csv``, as ``--compare`` / ``--seeds`` write them): per model, the test metrics as
mean +- std over seeds, the difference of the selection metric against the first model with its
paired bootstrap interval, the paired test's Holm-corrected p-value
(:mod:`recbole_iisan.evaluator.significance`), the training targets per epoch, seconds per epoch,
peak memory and the best epochs, with a mark on runs that were still improving at their epoch cap.
Every results table of the documentation is such a render, kept between markers
(``<!-- report FOLDER -->``, ``<!-- include FILE -->``); ``--docs`` refreshes them and
``tests/test_docs_tables.py`` re-renders them from the committed folders.

Also here: :func:`write_result` (a run's strict-JSON result, atomic), :func:`metric_keys` (table
columns from ``metrics`` x ``topk``) and :func:`format_gates`.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Optional, Sequence

from recbole_iisan.utils.files import PathLike, atomic_write_json, atomic_write_text
from recbole_iisan.utils.resources import peak_megabytes
from recbole_iisan.utils.tables import markdown_table, write_csv

# RecBole's metric class names -> their display names in tables
_DISPLAY = {"hit": "Hit", "ndcg": "NDCG", "mrr": "MRR", "recall": "Recall", "precision": "Precision",
            "map": "MAP", "itemcoverage": "ItemCoverage", "averagepopularity": "AveragePopularity",
            "giniindex": "GiniIndex", "shannonentropy": "ShannonEntropy", "tailpercentage": "TailPercentage"}


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


def write_result(path: PathLike, result: dict) -> None:
    """A run's result dict as strict JSON (no NaN / Infinity), written atomically."""
    atomic_write_json(path, result)


def format_gates(gates: dict) -> str:
    return "; ".join(f"{k}: " + ", ".join(f"{v:.3f}" for v in vals) for k, vals in gates.items())


# --------------------------------------------------------------------------------------------
# a folder of result files -> the comparison table (mean +- std over seeds, paired tests)

MANIFEST = "comparison.json"
#: the statistics' settings (``properties/overall.yaml``), kept in a folder's manifest
STATISTICS_KEYS = ("significance_test", "confidence_level", "bootstrap_resamples", "bootstrap_seed")
CAP_MARK = "†"


def result_name(label: str, seed: int) -> str:
    """``<Model>-seed<seed>`` (a variant ``IISANVS[item_id_embedding=True]``:
    ``IISANVS-item_id_embedding=True-seed<seed>``): the file stem of one run of a comparison folder."""
    import re

    stem = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", label).strip("-")
    return f"{stem}-seed{seed}"


def run_label(result: dict) -> str:
    """What a run is called in a comparison: its ``label`` (a variant), else its model."""
    return str(result.get("label") or result["model"])


def load_results(folder: PathLike) -> tuple[list[dict], dict]:
    """The run results of a comparison folder (every ``*.json`` but the manifest) and its manifest
    (``{}`` when there is none); one line for a file that is not a result."""
    import json
    from pathlib import Path

    from recbole_iisan.utils.errors import PluginConfigError

    root = Path(folder)
    if not root.is_dir():
        raise PluginConfigError(f"results folder {root}: not found")
    manifest = {}
    if (root / MANIFEST).is_file():
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    results = []
    for f in sorted(root.glob("*.json")):
        if f.name == MANIFEST:
            continue
        try:
            r = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PluginConfigError(f"{f}: not a JSON result file ({exc})") from None
        if not isinstance(r, dict) or "model" not in r or "test_result" not in r:
            raise PluginConfigError(f"{f}: not a run result (expected 'model' and 'test_result' keys)")
        r["_file"] = str(f)
        results.append(r)
    if not results:
        raise PluginConfigError(f"results folder {root}: holds no result files (*.json)")
    return results, manifest


def _model_order(results: Sequence[dict], manifest: dict, baseline: Optional[str]) -> list[str]:
    from recbole_iisan.utils.errors import PluginConfigError

    present = list(dict.fromkeys(run_label(r) for r in results))
    order = [m for m in manifest.get("models", []) if m in present] + [m for m in present if m not in manifest.get("models", [])]
    if baseline is not None:
        if baseline not in present:
            raise PluginConfigError(f"--baseline={baseline}: no result of that model here (models: {present})")
        order.remove(baseline)
        order.insert(0, baseline)
    return order


def _seed_averaged_per_user(runs: Sequence[dict], metric: str) -> "Any":
    """A pandas Series (index ``user_id``): each test user's ``metric`` averaged over the runs."""
    from pathlib import Path

    from recbole_iisan.utils.errors import PluginConfigError
    from recbole_iisan.evaluator import per_user

    columns = []
    for r in runs:
        if not r.get("per_user_file"):
            raise PluginConfigError(f"{r['_file']}: has no per-user metrics (per_user_file): re-run it with this version")
        table = per_user.read(Path(r["_file"]).parent / r["per_user_file"])
        if metric not in table.columns:
            raise PluginConfigError(f"{r['per_user_file']}: has no column {metric!r} (columns {list(table.columns)})")
        columns.append(table[metric])
    first = columns[0].index
    for c, r in zip(columns[1:], runs[1:]):
        if not c.index.sort_values().equals(first.sort_values()):
            raise PluginConfigError(f"{r['per_user_file']}: holds other test users than {runs[0]['per_user_file']} "
                                    f"(runs of one comparison must share the split)")
    import pandas as pd

    return pd.concat([c.reindex(first) for c in columns], axis=1).mean(axis=1)


def _fmt_mean_std(values: Sequence[float], digits: int = 4) -> str:
    from recbole_iisan.evaluator.significance import mean_std

    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def comparison_settings(overrides: Optional[dict] = None) -> dict:
    """The statistics' settings: ``properties/overall.yaml`` (the one home of defaults), then
    ``overrides``."""
    import yaml

    from recbole_iisan.utils.files import properties_dir

    data = yaml.safe_load((properties_dir() / "overall.yaml").read_text(encoding="utf-8"))
    out = {k: data[k] for k in STATISTICS_KEYS}
    out.update({k: v for k, v in (overrides or {}).items() if k in STATISTICS_KEYS and v is not None})
    return out


def summarize(folder: PathLike, baseline: Optional[str] = None, settings: Optional[dict] = None) -> dict:
    """Everything the comparison table shows, as numbers: ``{"rows": [...], "metric", "baseline",
    "test", ...}`` (one row per model, in the manifest's order, the baseline first)."""
    from recbole_iisan.utils.errors import PluginConfigError
    from recbole_iisan.evaluator.significance import compare_to_baseline, mean_std

    results, manifest = load_results(folder)
    settings = comparison_settings({**manifest.get("statistics", {}), **(settings or {})})
    order = _model_order(results, manifest, baseline)
    by_model = {m: sorted([r for r in results if run_label(r) == m], key=lambda r: r.get("seed", 0)) for m in order}
    selection = {str(r.get("valid_metric")) for r in results}
    if len(selection) != 1:
        raise PluginConfigError(f"results folder {folder}: runs selected on different metrics {sorted(selection)}")
    metric = selection.pop().lower()
    first = results[0]
    keys = metric_keys(first.get("metrics", ["Hit", "NDCG"]), first.get("topk", [10]))
    per_user = {m: _seed_averaged_per_user(rs, metric) for m, rs in by_model.items()}
    users = per_user[order[0]].index
    for m, values in per_user.items():  # paired: every model tested on the same users
        if not values.index.sort_values().equals(users.sort_values()):
            raise PluginConfigError(f"{by_model[m][0]['per_user_file']}: holds other test users than "
                                    f"{by_model[order[0]][0]['per_user_file']} (the models of a comparison must "
                                    f"share the split)")
    stats = compare_to_baseline({m: values.reindex(users).to_numpy() for m, values in per_user.items()},
                                order[0], metric, test=settings["significance_test"],
                                confidence=float(settings["confidence_level"]),
                                n_resamples=int(settings["bootstrap_resamples"]), seed=int(settings["bootstrap_seed"]))
    paired = {s.model: s for s in stats}
    rows = []
    for m, rs in by_model.items():
        row: dict = {"model": m, "seeds": [r.get("seed") for r in rs], "n_runs": len(rs)}
        for key, title in keys:
            vals = [float((r.get("test_result") or {}).get(key, float("nan"))) for r in rs]
            row[key] = mean_std(vals)
            row[f"{key} values"] = vals
        row["train_targets"] = sorted({r.get("train_targets") for r in rs}, key=lambda v: (v is None, v))
        secs = [r["train_seconds_per_epoch"] for r in rs if r.get("train_seconds_per_epoch") is not None]
        row["train_seconds_per_epoch"] = mean_std(secs) if secs else None
        row["peak_mb"] = max(peak_megabytes(r.get("peak_memory") or {}) for r in rs)
        row["best_epochs"] = [r.get("best_epoch") for r in rs]
        row["epochs_run"] = [r.get("epochs_run") for r in rs]
        row["at_cap"] = sum(1 for r in rs if r.get("converged") is False)
        row["paired"] = paired.get(m)
        rows.append(row)
    targets = {m: row["train_targets"] for m, row in zip(by_model, rows)}
    return {"rows": rows, "metric": metric, "baseline": order[0], "keys": keys, "settings": settings,
            "n_users": len(users), "equal_targets": len({tuple(v) for v in targets.values()}) == 1,
            "targets": targets, "manifest": manifest}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _fmt_p(p: float) -> str:
    return "< 1e-300" if p == 0 else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def render(summary: dict) -> str:
    """The markdown table (and its note) of :func:`summarize`'s result: what the docs embed."""
    metric_title = dict(summary["keys"]).get(summary["metric"], summary["metric"])
    base = summary["baseline"]
    conf = int(round(float(summary["settings"]["confidence_level"]) * 100))
    columns = (["model", "seeds"] + [f"test {t}" for _, t in summary["keys"]]
               + [f"Δ {metric_title} vs {base} [{conf}% CI]", "p (Holm)", "vs " + base,
                  "train targets", "train s/epoch", "peak MB", "best epoch"])
    out_rows = []
    for row in summary["rows"]:
        r = {"model": row["model"], "seeds": str(row["n_runs"])}
        for key, title in summary["keys"]:
            r[f"test {title}"] = _fmt_mean_std(row[f"{key} values"])
        pr = row["paired"]
        if pr is None:
            r[columns[2 + len(summary["keys"])]] = "(baseline)"
        else:
            r[columns[2 + len(summary["keys"])]] = f"{pr.mean_diff:+.4f} [{pr.ci_low:+.4f}, {pr.ci_high:+.4f}]"
            r["p (Holm)"] = _fmt_p(pr.p_holm)
            alpha = 1 - float(summary["settings"]["confidence_level"])
            r["vs " + base] = ("better" if pr.ci_low > 0 else "worse") if pr.significant(alpha) else "no significant difference"
        r["train targets"] = " / ".join(f"{t:,}" for t in row["train_targets"] if t is not None) or "n/a"
        sec = row["train_seconds_per_epoch"]
        r["train s/epoch"] = "n/a" if sec is None else (f"{sec[0]:.1f}" if sec[1] is None else f"{sec[0]:.1f} ± {sec[1]:.1f}")
        r["peak MB"] = f"{row['peak_mb']:,.0f}"
        mark = f" {CAP_MARK}{row['at_cap']}" if row["at_cap"] else ""
        r["best epoch"] = ", ".join(str(b) for b in row["best_epochs"]) + mark
        out_rows.append(r)
    test = summary["settings"]["significance_test"]
    test_name = "paired t-test (scipy.stats.ttest_rel)" if test == "ttest" else "Wilcoxon signed-rank test (scipy.stats.wilcoxon)"
    note = (f"Test split, best validation epoch ({summary['manifest'].get('protocol', 'see the runs')}). Mean ± std over "
            f"seeds. Δ: mean over the {summary['n_users']:,} test users of the per-user difference of "
            f"{metric_title} (each user's value averaged over seeds) against {base}, with a {conf}% paired bootstrap "
            f"interval (BCa, {int(summary['settings']['bootstrap_resamples']):,} resamples, seed "
            f"{summary['settings']['bootstrap_seed']}); p: two-sided {test_name} over the same users, Holm-corrected "
            f"over the {_plural(len(summary['rows']) - 1, 'model')} compared with {base}; better / worse: the interval excludes 0 "
            f"and p < {1 - float(summary['settings']['confidence_level']):.2g}, else no significant difference. best epoch: per seed; "
            f"{CAP_MARK}n: n runs still improving at their epoch cap (best epoch within stopping_step of it).")
    if len(summary["rows"]) == 1:
        note = note.split(" Δ:")[0] + " (one model: no paired test)."
    waiting = [m for m in summary["manifest"].get("models", []) if m not in {row["model"] for row in summary["rows"]}]
    if waiting:
        note += f" No result yet for {', '.join(waiting)} (the comparison is not finished)."
    return markdown_table(out_rows, columns) + "\n\n" + note


def csv_rows(summary: dict) -> tuple[list[dict], list[str]]:
    """The numbers of :func:`summarize` as CSV rows (one per model)."""
    columns = ["model", "n_runs", "seeds"]
    for key, _ in summary["keys"]:
        columns += [f"test_{key}_mean", f"test_{key}_std"]
    columns += [f"diff_{summary['metric']}", "ci_low", "ci_high", "p_value", "p_holm", "train_targets",
                "train_seconds_per_epoch", "peak_mb", "best_epochs", "epochs_run", "runs_at_cap"]
    rows = []
    for row in summary["rows"]:
        r = {"model": row["model"], "n_runs": row["n_runs"], "seeds": " ".join(str(s) for s in row["seeds"])}
        for key, _ in summary["keys"]:
            r[f"test_{key}_mean"], r[f"test_{key}_std"] = row[key]
        pr = row["paired"]
        if pr is not None:
            r.update({f"diff_{summary['metric']}": pr.mean_diff, "ci_low": pr.ci_low, "ci_high": pr.ci_high,
                      "p_value": pr.p_value, "p_holm": pr.p_holm})
        r["train_targets"] = " ".join(str(t) for t in row["train_targets"])
        sec = row["train_seconds_per_epoch"]
        r["train_seconds_per_epoch"] = None if sec is None else sec[0]
        r.update({"peak_mb": round(row["peak_mb"], 1), "best_epochs": " ".join(map(str, row["best_epochs"])),
                  "epochs_run": " ".join(map(str, row["epochs_run"])), "runs_at_cap": row["at_cap"]})
        rows.append(r)
    return rows, columns


def targets_warning(summary: dict) -> Optional[str]:
    """One line when the models of a comparison trained on different numbers of targets per epoch."""
    if summary["equal_targets"]:
        return None
    parts = ", ".join(f"{m} {' / '.join(f'{t:,}' for t in ts if t is not None)}" for m, ts in summary["targets"].items())
    return (f"warning: the models trained on different numbers of loss targets per epoch ({parts}): "
            f"this comparison is not of equal supervision")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m recbole_iisan.quick_start.results DIR``: print the comparison table of a results folder."""
    import argparse

    from recbole_iisan.utils.errors import EXIT_USER_ERROR, UserError

    p = argparse.ArgumentParser(prog="python -m recbole_iisan.quick_start.results",
                                description="The comparison table of a folder of result files (mean ± std over "
                                            "seeds, paired bootstrap interval, Holm-corrected paired test).")
    p.add_argument("folder", nargs="?", help="a results folder written by --compare / --seeds (one JSON + .users.csv per run)")
    p.add_argument("--docs", nargs="+", default=None, metavar="PAGE",
                   help="instead: re-render every <!-- report FOLDER --> / <!-- include FILE --> block of these "
                        "markdown pages in place (paths relative to the current folder)")
    p.add_argument("--baseline", default=None, help="the model the others are compared with (default: the first of the comparison)")
    p.add_argument("--csv", default=None, help="also write the numbers as CSV here")
    p.add_argument("--significance_test", default=None, choices=["ttest", "wilcoxon"])
    args = p.parse_args(argv)
    if args.docs:
        for page in update_docs(args.docs):
            print(f"updated {page}")
        return 0
    if not args.folder:
        p.error("give a results folder (or --docs PAGE ...)")
    try:
        summary = summarize(args.folder, args.baseline, {"significance_test": args.significance_test})
        print(render(summary))
        warning = targets_warning(summary)
        if warning:
            print("\n" + warning)
        if args.csv:
            rows, columns = csv_rows(summary)
            write_csv(args.csv, rows, columns)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------------------------
# the documentation's tables: renders kept between markers

DOC_BLOCK = re.compile(r"(<!-- (report|include) ([^>]*?) -->\n)(.*?)(<!-- /\2 -->)", re.S)


def render_block(kind: str, args: str, root: PathLike = ".") -> Optional[str]:
    """The content of a documentation block from the committed files, relative to ``root``:
    ``report FOLDER [--baseline=MODEL]`` -> :func:`render` of the folder; ``include FILE`` -> the
    file verbatim. None when the folder has no results (or the file does not exist) yet."""
    import shlex
    from pathlib import Path

    argv = shlex.split(args)
    target = Path(root) / argv[0]
    if kind == "include":
        return target.read_text(encoding="utf-8") if target.is_file() else None
    if not target.is_dir() or not any(target.glob("*-seed*.json")):
        return None
    baseline = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--baseline=")), None)
    return render(summarize(target, baseline)) + "\n"


def update_docs(pages: Sequence[PathLike], root: PathLike = ".") -> list[str]:
    """Re-render every ``<!-- report ... -->`` / ``<!-- include ... -->`` block of ``pages`` in
    place (atomic writes); returns the pages that changed."""
    from pathlib import Path

    changed = []
    for page in pages:
        text = Path(page).read_text(encoding="utf-8")

        def fill(m: "re.Match") -> str:
            body = render_block(m.group(2), m.group(3), root)
            return m.group(1) + ("" if body is None else body.rstrip("\n") + "\n") + m.group(5)

        new = DOC_BLOCK.sub(fill, text)
        if new != text:
            atomic_write_text(page, new)
            changed.append(str(page))
    return changed
