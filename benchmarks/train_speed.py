"""IISAN's training and evaluation speed next to RecBole's SASRec, on the same data and machine.

    python benchmarks/train_speed.py --dataset=Scientific [--models=SASRec,IISANVS,IISANVA]
        [--epochs=2] [--levers=base,bf16,tbs256] [--key=value ...]

Each model runs in a fresh process (so its peak memory is its own) through the plugin's normal
path (same split, batch size and evaluator) for ``--epochs`` epochs; the encoder caches are built
before timing starts. Prints training-only seconds per epoch, seconds per full-ranking
evaluation pass, peak memory (CUDA max allocated on GPU, process peak RSS on CPU) and each
run's ratio to the first model's ``base`` run (the baseline, normally SASRec) of the same
invocation, both in wall seconds and in the process's CPU seconds (``time.process_time`` around
each training epoch / evaluation pass; with OMP_NUM_THREADS=1 it is what the work costs, and it
stays meaningful when other jobs load the machine, which wall seconds do not).

Speed levers (``--levers``, each one run per model it applies to; ``base`` = the defaults):

* ``bf16``: bfloat16 autocast on the CPU. Training: RecBole's own ``enable_amp: True``, which
  wraps each training step (``calculate_loss``) in ``torch.autocast('cpu')``, whose CPU dtype
  is bfloat16 (``mixed_precision: bf16`` only applies on CUDA). Evaluation: each full-sort
  batch (item table + scores) runs under ``torch.autocast('cpu', dtype=torch.bfloat16)``.
* ``tbs256`` / ``tbs4096``: ``tower_batch_size`` 256 / 4096 (items per tower pass when the item
  table is built for evaluation); IISAN models only. The default is 256 since this benchmark
  measured 4096 -> 256 at 0.74-0.78x the evaluation CPU time on Scientific (20,314 items).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVERS = {
    "base": {},
    "bf16": {"enable_amp": True},
    "tbs256": {"tower_batch_size": 256},
    "tbs4096": {"tower_batch_size": 4096},
}
IISAN_ONLY = {"tbs256", "tbs4096"}


def _speed_child(model, dataset, config_dict, bf16_eval, queue) -> None:
    """One run in a fresh process; with ``bf16_eval`` the full-sort evaluation runs under CPU
    bfloat16 autocast."""
    import torch

    from recbole_iisan.quick_start.pipeline import run

    import time

    from recbole_iisan.trainer.trainer import PluginTrainer

    cpu = {"train": [], "eval": []}

    def timed(method, key):
        def wrapper(self, *a, **kw):
            t0 = time.process_time()  # this process's CPU seconds: robust to other load on the machine
            out = method(self, *a, **kw)
            cpu[key].append(time.process_time() - t0)
            return out
        return wrapper

    PluginTrainer._train_epoch = timed(PluginTrainer._train_epoch, "train")
    PluginTrainer._valid_epoch = timed(PluginTrainer._valid_epoch, "eval")
    try:
        if bf16_eval:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # what enable_amp uses on CPU
            from recbole_iisan.trainer.trainer import PluginTrainer

            original = PluginTrainer._full_sort_batch_eval

            def _full_sort_batch_eval_bf16(self, batched_data):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return original(self, batched_data)

            PluginTrainer._full_sort_batch_eval = _full_sort_batch_eval_bf16
        result = run(model, dataset, None, config_dict)
        result["train_cpu_seconds_per_epoch"] = sum(cpu["train"]) / max(1, len(cpu["train"]))
        result["eval_cpu_seconds_per_pass"] = sum(cpu["eval"]) / max(1, len(cpu["eval"]))
        queue.put(result)
    except Exception as exc:  # noqa: BLE001  (reported in the table, the other runs go on)
        queue.put({"model": model, "error": f"{type(exc).__name__}: {exc}"})


def _run(model, dataset, config_dict, bf16_eval) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_speed_child, args=(model, dataset, config_dict, bf16_eval, queue))
    proc.start()
    proc.join()
    if queue.empty():
        return {"model": model, "error": f"exit code {proc.exitcode}"}
    return queue.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="Scientific")
    p.add_argument("--models", default="SASRec,IISANVS,IISANVA")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--levers", default="base", help=f"comma-separated, of {list(LEVERS)}")
    args, rest = p.parse_known_args()
    levers = [l for l in args.levers.split(",") if l]
    unknown = [l for l in levers if l not in LEVERS]
    if unknown or "base" not in levers:
        p.error(f"--levers: expected 'base' and any of {list(LEVERS)}, got {levers}")

    import recbole_iisan  # noqa: F401
    from recbole_iisan.config.configurator import build_config, parse_overrides
    from recbole_iisan.data.utils import prepare_inputs
    from recbole_iisan.utils.tables import markdown_table

    models = [m for m in args.models.split(",") if m]
    config_dict = {"epochs": args.epochs, "stopping_step": 10**6, "show_progress": False}
    config_dict.update(parse_overrides(rest))  # --key=value: the run's one parser
    for m in models:
        prepare_inputs(build_config(m, args.dataset, config_dict=config_dict))
    runs = []
    for lever in levers:
        for m in models:
            if lever in IISAN_ONLY and not m.startswith("IISAN"):
                continue
            r = _run(m, args.dataset, dict(config_dict, **LEVERS[lever]), bf16_eval=(lever == "bf16"))
            r["lever"] = lever
            runs.append(r)
            print(f"{m} [{lever}]: " + (r["error"] if "error" in r else
                  f"train {r['train_seconds_per_epoch']:.2f} s/epoch ({r['train_cpu_seconds_per_epoch']:.2f} CPU s), "
                  f"eval {r['eval_seconds_per_pass']:.2f} s/pass ({r['eval_cpu_seconds_per_pass']:.2f} CPU s), "
                  f"test {r.get('test_result')}"), flush=True)
    base = runs[0]
    rows = []
    for r in runs:
        if "error" in r:
            rows.append({"model": r["model"], "lever": r["lever"], "train s/epoch": "failed: " + r["error"][:60]})
            continue
        mem = r["peak_memory"]
        peak = mem.get("cuda_max_allocated", mem["peak_rss"])
        base_peak = base["peak_memory"].get("cuda_max_allocated", base["peak_memory"]["peak_rss"])
        same_model_base = next((b for b in runs if b["model"] == r["model"] and b["lever"] == "base"
                                and "error" not in b), None)
        test = r.get("test_result") or {}
        cpu_t, cpu_e = r["train_cpu_seconds_per_epoch"], r["eval_cpu_seconds_per_pass"]
        rows.append({
            "model": r["model"],
            "lever": r["lever"],
            "train s/epoch": f"{r['train_seconds_per_epoch']:.2f}",
            f"x {base['model']}": f"{r['train_seconds_per_epoch'] / base['train_seconds_per_epoch']:.2f}",
            "x own base": (f"{r['train_seconds_per_epoch'] / same_model_base['train_seconds_per_epoch']:.2f}"
                           if same_model_base else ""),
            "eval s/pass": f"{r['eval_seconds_per_pass']:.2f}",
            f"eval x {base['model']}": f"{r['eval_seconds_per_pass'] / base['eval_seconds_per_pass']:.2f}",
            "eval x own base": (f"{r['eval_seconds_per_pass'] / same_model_base['eval_seconds_per_pass']:.2f}"
                                if same_model_base else ""),
            "train CPU s": f"{cpu_t:.2f}",
            f"CPU x {base['model']}": f"{cpu_t / base['train_cpu_seconds_per_epoch']:.2f}",
            "CPU x own base": (f"{cpu_t / same_model_base['train_cpu_seconds_per_epoch']:.2f}"
                               if same_model_base else ""),
            "eval CPU s": f"{cpu_e:.2f}",
            f"eval CPU x {base['model']}": f"{cpu_e / base['eval_cpu_seconds_per_pass']:.2f}",
            "eval CPU x own base": (f"{cpu_e / same_model_base['eval_cpu_seconds_per_pass']:.2f}"
                                    if same_model_base else ""),
            "test ndcg@10": f"{test.get('ndcg@10', float('nan')):.4f}",
            "peak memory MB": f"{peak / 2**20:.0f}",
            f"memory x {base['model']}": f"{peak / base_peak:.2f}",
            "trainable params": f"{r['trainable_parameters']:,}",
        })
    cols = list(rows[0].keys()) if rows else []
    for r in rows:
        cols += [c for c in r if c not in cols]
    print(f"\n{args.dataset}: {args.epochs} epoch(s) per run, device {base.get('device', '?')}")
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
