"""The command line of ``run_recbole_iisan.py`` (RecBole's ``run_recbole.py`` flags, plus ours).

    python run_recbole_iisan.py --model=IISANVA --dataset=Scientific [--config_files="a.yaml b.yaml"]
        [--key=value ...]                    any RecBole / plugin config key
        [--paper_protocol]                   the paper's protocol instead of RecBole's
        [--compare=SASRec,GRU4Rec,IISANVS,IISANVA] [--seeds=2020,2021,2022] [--results_dir=DIR]
        [--jobs=N] [--resume]                 several models and seeds, paired tests (recbole_iisan.quick_start.compare)
        [--result_file=PATH.json] [--resume=CHECKPOINT.safetensors]
        [--nproc=N --world_size=W --ip=IP --port=PORT --group_offset=K]   RecBole's DDP mode
        [--tune=hyper.test ...]              Ray Tune search (see recbole_iisan.quick_start.tune, recbole_iisan.trainer.hyper_tuning)

Bad input (unknown model or dataset, missing files, a config value of the wrong type, an image
model without images) ends in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

DEFAULT_MODEL = "IISANVA"
DEFAULT_DATASET = "ml-100k"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_recbole_iisan.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None, help=f"IISANVS, IISANVA or any RecBole model name (default "
                   f"{DEFAULT_MODEL}; with --recommend: the checkpoint's)")
    p.add_argument("--dataset", "-d", default=None, help=f"dataset name under data_path (default {DEFAULT_DATASET}; "
                   f"with --recommend: the checkpoint's)")
    p.add_argument("--config_files", default=None, help="space-separated yaml files")
    p.add_argument("--paper_protocol", action="store_true", help="the authors' protocol: last 13 items per user, one training window per user, "
                   "full-history masking, selection on Hit@10, the authors' user encoder")
    p.add_argument("--compare", default=None, help="comma-separated models to run and tabulate; the first is the "
                   "baseline of the paired tests; a variant: 'IISANVS[item_id_embedding=False]'")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: every model runs once per seed (mean ± std, "
                   "paired tests over users); also 'seeds: [...]' in yaml")
    p.add_argument("--results_dir", default=None, help="folder of the runs' result files and the table (--compare, "
                   "--seeds; default saved/compare-<dataset>-<time>)")
    p.add_argument("--jobs", type=int, default=1, help="runs of --compare/--seeds at a time (each gets cpu_count/jobs "
                   "torch threads)")
    p.add_argument("--compare_file", default=None, help="also write the comparison's CSV here")
    p.add_argument("--result_file", default=None, help="JSON result file (default under saved/)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="--resume=CHECKPOINT.safetensors resumes a training run; with --compare/--seeds, --resume continues "
                   "the comparison in --results_dir; with --tune, --resume resumes the search")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--world_size", type=int, default=-1)
    p.add_argument("--ip", default="localhost")
    p.add_argument("--port", default="5678")
    p.add_argument("--group_offset", type=int, default=0)
    p.add_argument("--tune", default=None, help="hyper.test file: run a Ray Tune search (one seed per trial: "
                   "the config's 'seed'; --seeds does not apply)")
    p.add_argument("--strict", action="store_true", help="unknown config keys are an error (strict_config: True)")
    p.add_argument("--trust_checkpoint", action="store_true", help="UNSAFE: load a checkpoint of an older version "
                   "(a pickle) even when it holds objects outside the allow-list; a pickle runs the code it holds, so "
                   "only for a file from someone you trust (trust_checkpoint: True)")
    r = p.add_argument_group("recommend / export (recbole_iisan.serving.recommend, recbole_iisan.serving.export)")
    r.add_argument("--recommend", default=None, help="CHECKPOINT.safetensors: print top-k items (--topk=K, default 10)")
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
    if args.trust_checkpoint:
        d["trust_checkpoint"] = True
    return d


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``run_recbole_iisan.py`` and the ``recbole-iisan`` command (one ``error:`` line on bad input)."""
    from recbole_iisan.utils.errors import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)

    def body() -> int:
        from recbole_iisan.config.configurator import parse_overrides

        return _main(args, rest, parse_overrides(rest))

    return run_cli(body)


def _main(args: argparse.Namespace, rest: list[str], overrides: dict) -> int:
    config_files = args.config_files.split() if args.config_files else None
    config_dict = _config_dict(args)

    import recbole_iisan  # noqa: F401  (applies the compat shims)
    from recbole_iisan.quick_start import pipeline as quick_start

    if args.recommend or args.export:
        from recbole_iisan.serving.recommend import main as recommend_main

        given = {"model": args.model, "dataset": args.dataset}
        return recommend_main(args, overrides, config_files, config_dict, given={k: v for k, v in given.items() if v})
    args.model = args.model or DEFAULT_MODEL
    args.dataset = args.dataset or DEFAULT_DATASET
    if args.tune:
        from recbole_iisan.quick_start.tune import main as tune_main

        return tune_main(args, overrides, config_files, config_dict)
    if args.compare or args.seeds:
        from recbole_iisan.quick_start.compare import compare, parse_entries, parse_seeds
        from recbole_iisan.config.configurator import get_model_class

        entries = parse_entries(args.compare or args.model)
        for _, m, _ in entries:
            get_model_class(m)  # unknown names fail before anything runs
        if args.resume not in (None, True):
            print("error: with --compare/--seeds, --resume takes no value: it continues the comparison in "
                  "--results_dir", file=sys.stderr)
            return 2
        if args.resume and not args.results_dir:
            print("error: --resume of a comparison needs the folder it writes to: --results_dir=DIR", file=sys.stderr)
            return 2
        return compare(entries, args.dataset, config_files, config_dict, overrides, seeds=parse_seeds(args.seeds),
                       results_dir=args.results_dir, compare_file=args.compare_file, resume=bool(args.resume),
                       jobs=args.jobs, breakdown=args.breakdown)
    if args.nproc > 1 or args.world_size > 0:
        quick_start.run_distributed(args.model, args.dataset, config_files, config_dict, overrides, nproc=args.nproc,
                                    world_size=args.world_size, ip=args.ip, port=args.port,
                                    group_offset=args.group_offset, result_file=args.result_file)
        return 0
    if args.resume is True:
        print("error: --resume needs a checkpoint path (--resume=saved/MODEL-....safetensors) outside --tune", file=sys.stderr)
        return 2
    result = quick_start.run(args.model, args.dataset, config_files, config_dict, overrides,
                             resume=args.resume, result_file=args.result_file)
    test = result.get("test_result") or {}
    sec = result["train_seconds_per_epoch"]
    print(f"{result['model']} on {result['dataset']}: test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
          + f" | {result['trainable_parameters']:,} trainable parameters"
          + (f" | {sec:.2f} s/epoch" if sec is not None else "") + f" | result: {result['result_file']}")
    return 0
