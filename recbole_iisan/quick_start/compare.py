"""``--compare`` and ``--seeds``: several models (and seeds) on one split, in one results folder.

    python run_recbole_iisan.py --dataset=Scientific --paper_protocol \\
        --compare=SASRec,GRU4Rec,IISANVS,IISANVA --seeds=2020,2021,2022 \\
        --results_dir=results/scientific_paper_protocol [--jobs=2] [--resume]

The inputs (atomic files, encoder caches) are prepared once, here; then every (model, seed) runs in
its own process (its peak memory is its own), ``--jobs`` at a time, each writing into the folder:

- ``<Model>-seed<seed>.json``: the run's result (``quick_start.run``), and
  ``<Model>-seed<seed>.users.csv``: each test user's metrics, for the paired tests;
- ``checkpoints/<Model>-seed<seed>.safetensors`` (the best model) and ``...-last.safetensors`` (the whole training
  state after every validation: an interrupted run resumes exactly where it stopped);
- ``comparison.json``: the models (the first is the baseline), seeds and settings;
- ``compare.md`` / ``compare.csv``: the table of :mod:`recbole_iisan.quick_start.results` (mean +- std over
  seeds, the paired bootstrap interval and Holm-corrected paired test against the first model).

``--resume`` continues a folder: finished runs (a result file) are kept, interrupted ones resume
from their last state, the others start. The seed changes the initialisation and the batch order,
never the data or the split (RecBole's leave-one-out split is deterministic).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from recbole_iisan.quick_start import results
from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.utils.tables import write_csv
from recbole_iisan.utils.files import atomic_write_json, atomic_write_text

CHECKPOINTS = "checkpoints"


def parse_entries(text: str) -> list[tuple[str, str, dict]]:
    """``--compare`` entries -> ``[(label, model, overrides)]``. An entry is a model name, or a
    variant ``Model[key=value;key=value]`` (an ablation: ``IISANVS[item_id_embedding=False]``),
    whose label is the entry itself; values are parsed as on the command line."""
    from recbole_iisan.config.configurator import parse_overrides

    entries, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            entries.append(cur.strip())
            cur = ""
        else:
            cur += ch
    entries.append(cur.strip())
    out = []
    for e in (e for e in entries if e):
        if "[" not in e:
            out.append((e, e, {}))
            continue
        model, _, rest = e.partition("[")
        if not rest.endswith("]") or not model.strip():
            raise PluginConfigError(f"--compare entry {e!r}: expected Model or Model[key=value;key=value]")
        pairs = [p.strip() for p in rest[:-1].split(";") if p.strip()]
        extra = parse_overrides([f"--{p}" for p in pairs], where=f"--compare entry {e!r}")
        out.append((e.replace(" ", ""), model.strip(), extra))
    labels = [label for label, _, _ in out]
    if len(set(labels)) != len(labels):
        raise PluginConfigError(f"--compare={text}: an entry is given twice")
    if not out:
        raise PluginConfigError("--compare: no model given")
    return out


def parse_seeds(text: Optional[str]) -> Optional[list[int]]:
    """``"2020,2021,2022"`` -> ``[2020, 2021, 2022]``; one line for anything else."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise PluginConfigError(f"--seeds={text}: expected comma-separated integers, e.g. --seeds=2020,2021,2022") from None
    if not seeds:
        raise PluginConfigError(f"--seeds={text}: no seed given")
    if len(set(seeds)) != len(seeds):
        raise PluginConfigError(f"--seeds={text}: a seed is given twice")
    return seeds


def seeds_of(config: Any, cli_seeds: Optional[list[int]]) -> list[int]:
    """The seeds of a comparison: ``--seeds``, else the yaml's ``seeds``, else ``[seed]``."""
    if cli_seeds:
        return cli_seeds
    seeds = config["seeds"]
    if seeds:
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise PluginConfigError(f"config key 'seeds' must be a list of integers, got {seeds!r}")
        return list(seeds)
    return [int(config["seed"])]


def run_paths(folder: Path, label: str, seed: int) -> dict[str, Path]:
    name = results.result_name(label, seed)
    return {"result": folder / f"{name}.json", "checkpoint": folder / CHECKPOINTS / f"{name}.safetensors",
            "last": folder / CHECKPOINTS / f"{name}-last.safetensors"}


def _manifest(dataset: str, models: Sequence[str], seeds: Sequence[int], protocol: str, config_files,
              config_dict: dict, overrides: dict) -> dict:
    return {"dataset": dataset, "models": list(models), "seeds": list(seeds), "protocol": protocol,
            "config_files": list(config_files or []), "config_dict": dict(config_dict or {}),
            "overrides": {k: v for k, v in (overrides or {}).items()},
            "command": "python run_recbole_iisan.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}


def _check_folder(folder: Path, manifest: dict, resume: bool) -> None:
    """A folder holds one comparison: a different one there is refused in one line."""
    path = folder / results.MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    same = all(old.get(k) == manifest[k] for k in ("dataset", "models", "seeds", "protocol", "config_dict", "overrides"))
    if not resume and any(folder.glob("*-seed*.json")):
        raise PluginConfigError(f"--results_dir={folder} already holds a comparison: pass --resume to continue it, "
                                f"or choose another --results_dir")
    if resume and not same:
        diff = [k for k in ("dataset", "models", "seeds", "protocol", "config_dict", "overrides") if old.get(k) != manifest[k]]
        raise PluginConfigError(f"--resume: {folder} holds a comparison with other {', '.join(diff)} "
                                f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); resume it with the same flags")


def _child(label: str, model: str, dataset: str, seed: int, config_files, config_dict, overrides, paths: dict,
           threads: int, queue) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from recbole_iisan.quick_start.pipeline import run

    try:
        resume = str(paths["last"]) if paths["last"].is_file() else None
        run(model, dataset, config_files, config_dict, dict(overrides, seed=seed), queue=queue,
            result_file=str(paths["result"]), checkpoint_file=str(paths["checkpoint"]),
            last_checkpoint_file=str(paths["last"]), resume=resume, label=label)
    except Exception as exc:  # reported in the table; the other runs go on
        queue.put({"model": label, "seed": seed, "error": f"{type(exc).__name__}: {exc}"})


def _run_all(runs: list[tuple[str, str, dict, int]], dataset: str, config_files, config_dict, overrides,
             folder: Path, jobs: int) -> list[dict]:
    """Every (model, seed) in its own spawned process, ``jobs`` at a time."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    pending, active, errors = list(runs), [], []
    while pending or active:
        while pending and len(active) < jobs:
            label, model, extra, seed = pending.pop(0)
            queue = ctx.SimpleQueue()
            proc = ctx.Process(target=_child, args=(label, model, dataset, seed, config_files, config_dict,
                                                    dict(overrides, **extra), run_paths(folder, label, seed),
                                                    threads, queue))
            proc.start()
            active.append((label, seed, proc, queue))
        time.sleep(0.2)
        for item in list(active):
            model, seed, proc, queue = item
            if proc.is_alive():
                continue
            proc.join()
            active.remove(item)
            got = queue.get() if not queue.empty() else {"error": f"exit code {proc.exitcode}"}
            if "error" in got:
                errors.append({"model": model, "seed": seed, "error": got["error"]})
                print(f"error: {model} seed {seed}: {got['error']}", file=sys.stderr)
    return errors


def compare(entries: Sequence[tuple[str, str, dict]], dataset: str, config_files, config_dict: dict, overrides: dict,
            seeds: Optional[list[int]] = None, results_dir: Optional[str] = None, compare_file: Optional[str] = None,
            resume: bool = False, jobs: int = 1, breakdown: bool = False) -> int:
    """Run every entry (``(label, model, overrides)``, :func:`parse_entries`) once per seed into
    ``results_dir`` and print the comparison table. Returns 0 when every run finished, 1 otherwise
    (the table shows the finished ones)."""
    from recbole_iisan.config.configurator import build_config
    from recbole_iisan.data.utils import prepare_inputs

    if jobs < 1:
        raise PluginConfigError(f"--jobs={jobs}: expected an integer >= 1")
    overrides = {k: v for k, v in (overrides or {}).items() if k not in ("seed", "seeds")}
    configs = [build_config(m, dataset, config_files, config_dict, dict(overrides, **extra)) for _, m, extra in entries]
    models = [label for label, _, _ in entries]
    seeds = seeds_of(configs[0], seeds)
    protocol = "paper protocol" if configs[0]["paper_protocol"] else "RecBole protocol"
    folder = Path(results_dir or os.path.join("saved", f"compare-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    manifest = _manifest(dataset, models, seeds, protocol, config_files, config_dict, overrides)
    # the statistics of the table, kept with the folder so that every later render is the same
    manifest["statistics"] = {k: configs[0][k] for k in results.STATISTICS_KEYS}
    _check_folder(folder, manifest, resume)
    for config in configs:  # bad names, types and metrics fail here, before anything runs
        prepare_inputs(config)
    (folder / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / results.MANIFEST, manifest)
    runs = [(label, m, extra, s) for label, m, extra in entries for s in seeds]
    todo = [r for r in runs if not run_paths(folder, r[0], r[3])["result"].is_file()]
    if len(todo) < len(runs):
        print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished in {folder}; running {len(todo)}")
    errors = _run_all(todo, dataset, config_files, config_dict, overrides, folder, jobs)
    if len(errors) == len(runs):
        return 1
    summary = results.summarize(folder)
    table = results.render(summary)
    atomic_write_text(folder / "compare.md", table + "\n")
    rows, columns = results.csv_rows(summary)
    write_csv(folder / "compare.csv", rows, columns)
    if compare_file:
        write_csv(compare_file, rows, columns)
    print(f"\n{dataset}, {protocol}, test split (best validation epoch):\n{table}\n\nwritten to {folder}")
    warning = results.targets_warning(summary)
    if warning:
        print(warning)
    at_cap = [f"{r['model']} ({r['at_cap']} of {r['n_runs']})" for r in summary["rows"] if r["at_cap"]]
    if at_cap:
        print(f"warning: still improving at the epoch cap: {', '.join(at_cap)}: raise --epochs")
    if breakdown:
        from recbole_iisan.evaluator import breakdown as bd

        first_seed = [json.loads(run_paths(folder, m, seeds[0])["result"].read_text()) for m in models
                      if run_paths(folder, m, seeds[0])["result"].is_file()]
        metric = f"{str(configs[0]['metrics'][0]).lower()}@{max(configs[0]['topk'])}"
        png_path = os.path.splitext(compare_file)[0] + "-breakdown.png" if compare_file else str(folder / "breakdown.png")
        png = bd.plot(first_seed, metric, png_path)
        print(f"\n{bd.markdown(first_seed, metric)}\n\nbreakdown plot: {png}")
    return 0 if not errors else 1
