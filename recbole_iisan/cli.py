"""The command line of ``run_recbole_iisan.py`` (RecBole's ``run_recbole.py`` flags, plus ours).

    python run_recbole_iisan.py --model=IISANVA --dataset=Scientific [--config_files="a.yaml b.yaml"]
        [--key=value ...]                    any RecBole / plugin config key
        [--paper_protocol]                   the paper's protocol instead of RecBole's
        [--compare=SASRec,GRU4Rec,IISANVS,IISANVA] [--compare_file=PATH.csv]
        [--result_file=PATH.json] [--resume=CHECKPOINT.pth]
        [--nproc=N --world_size=W --ip=IP --port=PORT --group_offset=K]   RecBole's DDP mode
        [--tune=hyper.test ...]              Ray Tune search (see recbole_iisan.tuning)

Bad input (unknown model or dataset, missing files, a config value of the wrong type, an image
model without images) ends in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_recbole_iisan.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default="IISANVA", help="IISANVS, IISANVA or any RecBole model name")
    p.add_argument("--dataset", "-d", default="ml-100k", help="dataset name under data_path (or ml-100k)")
    p.add_argument("--config_files", default=None, help="space-separated yaml files")
    p.add_argument("--paper_protocol", action="store_true", help="the authors' protocol: last 13 items per user, one training window per user, "
                   "full-history masking, selection on Hit@10, the authors' user encoder")
    p.add_argument("--compare", default=None, help="comma-separated models to run and tabulate")
    p.add_argument("--compare_file", default=None, help="CSV for --compare (default saved/compare-<dataset>-<time>.csv)")
    p.add_argument("--result_file", default=None, help="JSON result file (default under saved/)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="--resume=CHECKPOINT.pth resumes a training run; with --tune, --resume resumes the search")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--world_size", type=int, default=-1)
    p.add_argument("--ip", default="localhost")
    p.add_argument("--port", default="5678")
    p.add_argument("--group_offset", type=int, default=0)
    p.add_argument("--tune", default=None, help="hyper.test file: run a Ray Tune search")
    p.add_argument("--strict", action="store_true", help="unknown config keys are an error (strict_config: True)")
    r = p.add_argument_group("recommend / export (recbole_iisan.recommend, recbole_iisan.export)")
    r.add_argument("--recommend", default=None, help="CHECKPOINT.pth: print top-k items (--topk=K, default 10)")
    r.add_argument("--users", default=None, help="comma-separated raw user ids (with --recommend)")
    r.add_argument("--sequence", action="append", default=None, help='"i1 i2 i3": a raw-id history (repeatable)')
    r.add_argument("--new_items", default=None, help="TSV raw id TAB title [TAB image path]: unseen items to rank too")
    r.add_argument("--export", default=None, help="DIR: item table .npy/.tsv + TorchScript user encoder")
    r.add_argument("--include_history", action="store_true", help="do not exclude the user's history items")
    r.add_argument("--recommend_file", default=None, help="also write the recommendations as TSV")
    r.add_argument("--breakdown", action="store_true", help="test Hit/NDCG by target frequency, repeat, length "
                   "(--compare: tables + PNG; --recommend=CKPT: of that model)")
    t = p.add_argument_group("tuning (with --tune)")
    t.add_argument("--num_samples", type=int, default=8, help="trials to run")
    t.add_argument("--search_alg", default="random", help="random | hyperopt | optuna")
    t.add_argument("--max_concurrent", type=int, default=0, help="trials at once (0: as many as resources allow)")
    t.add_argument("--cpus_per_trial", type=float, default=1.0)
    t.add_argument("--gpus_per_trial", type=float, default=0.0, help="fractions allowed, e.g. 0.25")
    t.add_argument("--ray_address", default=None, help="join an existing Ray cluster (e.g. auto or ray://host:10001)")
    t.add_argument("--storage_path", default="ray_results", help="where Ray Tune keeps results (absolute or shared path)")
    t.add_argument("--tune_name", default=None, help="experiment name (default <model>-<dataset>)")
    return p


def _config_dict(args: argparse.Namespace) -> dict:
    d = {}
    if args.paper_protocol:
        d["paper_protocol"] = True
    if args.strict:
        d["strict_config"] = True
    return d


def _run_in_subprocess(model: str, dataset: str, config_files, config_dict, overrides) -> dict:
    """One compared model in a fresh process: its peak memory is its own (``VmHWM``)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_compare_child, args=(model, dataset, config_files, config_dict, overrides, queue))
    proc.start()
    proc.join()
    if queue.empty():
        return {"model": model, "error": f"exit code {proc.exitcode}"}
    return queue.get()


def _compare_child(model, dataset, config_files, config_dict, overrides, queue) -> None:
    from recbole_iisan.quick_start import run

    try:
        run(model, dataset, config_files, config_dict, overrides, queue=queue)
    except Exception as exc:  # reported in the table, the other models go on
        queue.put({"model": model, "error": f"{type(exc).__name__}: {exc}"})


def compare(models: Sequence[str], dataset: str, config_files, config_dict, overrides,
            compare_file: Optional[str] = None, protocol: str = "RecBole protocol", breakdown: bool = False) -> int:
    """``--compare``: inputs prepared once per model here, then each model in its own process;
    one table whose metric columns are the configured ``metrics`` x ``topk``."""
    from recbole_iisan import report
    from recbole_iisan.config import build_config
    from recbole_iisan.quick_start import prepare_inputs

    configs = [build_config(m, dataset, config_files, config_dict, overrides) for m in models]
    for config in configs:  # bad names, types and metrics fail here, before anything runs
        prepare_inputs(config)
    results = [_run_in_subprocess(m, dataset, config_files, config_dict, overrides) for m in models]
    metrics, topk = list(configs[0]["metrics"]), list(configs[0]["topk"])
    columns = report.compare_columns(metrics, topk)
    rows = report.compare_rows(results, metrics, topk)
    path = compare_file or os.path.join("saved", f"compare-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}.csv")
    report.write_csv(path, rows, columns)
    print(f"\n{dataset}, {protocol}, test split (best validation epoch):\n{report.markdown_table(rows, columns)}"
          f"\n\nwritten to {path}")
    if breakdown:
        from recbole_iisan import breakdown as bd

        metric = f"{metrics[0].lower()}@{max(topk)}"
        png = bd.plot(results, metric, os.path.splitext(path)[0] + "-breakdown.png")
        print(f"\n{bd.markdown(results, metric)}\n\nbreakdown plot: {png}")
    return 0 if all("error" not in r for r in results) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    from recbole_iisan.errors import EXIT_USER_ERROR, UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    try:
        from recbole_iisan.config import parse_overrides

        overrides = parse_overrides(rest)
        return _main(args, rest, overrides)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # a full disk anywhere else: one line (checks.is_disk_full), else the traceback
        from recbole_iisan.checks import disk_full_message, is_disk_full

        path = getattr(exc, "filename", None)
        if not is_disk_full(exc, path):
            raise
        print(f"error: {disk_full_message(path)}", file=sys.stderr)
        return EXIT_USER_ERROR


def _main(args: argparse.Namespace, rest: list[str], overrides: dict) -> int:
    config_files = args.config_files.split() if args.config_files else None
    config_dict = _config_dict(args)

    import recbole_iisan  # noqa: F401  (applies the compat shims)
    from recbole_iisan import quick_start

    if args.recommend or args.export:
        from recbole_iisan.recommend import main as recommend_main

        return recommend_main(args, overrides)
    if args.tune:
        from recbole_iisan.tuning import main as tune_main

        return tune_main(args, overrides, config_files, config_dict)
    if args.compare:
        from recbole_iisan.config import get_model_class

        models = [m.strip() for m in args.compare.split(",") if m.strip()]
        for m in models:
            get_model_class(m)  # unknown names fail before anything runs
        protocol = "paper protocol" if args.paper_protocol else "RecBole protocol"
        return compare(models, args.dataset, config_files, config_dict, overrides, args.compare_file, protocol,
                       breakdown=args.breakdown)
    if args.nproc > 1 or args.world_size > 0:
        quick_start.run_distributed(args.model, args.dataset, config_files, config_dict, overrides, nproc=args.nproc,
                                    world_size=args.world_size, ip=args.ip, port=args.port,
                                    group_offset=args.group_offset, result_file=args.result_file)
        return 0
    if args.resume is True:
        print("error: --resume needs a checkpoint path (--resume=saved/MODEL-....pth) outside --tune", file=sys.stderr)
        return 2
    result = quick_start.run(args.model, args.dataset, config_files, config_dict, overrides,
                             resume=args.resume, result_file=args.result_file)
    test = result.get("test_result") or {}
    sec = result["train_seconds_per_epoch"]
    print(f"{result['model']} on {result['dataset']}: test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
          + f" | {result['trainable_parameters']:,} trainable parameters"
          + (f" | {sec:.2f} s/epoch" if sec is not None else "") + f" | result: {result['result_file']}")
    return 0
