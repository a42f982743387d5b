"""Where a training step on full windows spends its time: the fused kernel's parts, and the share
and rate of the matmuls, next to the measured peak of this thread.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py [--items 20314] [--rows 7] [--dim 768]
        [--batch 64] [--steps 20] [--out results/speed]

The work is ``step_speed.py``'s ``train full`` (IISANVS under the paper protocol, random cached
states of BERT-base / ViT-base shapes, ``--batch`` windows whose slots are all distinct items; one
step = forward, backward, Adam). Two passes over ``--steps`` steps each:

- **parts**: CPU seconds inside each piece of :mod:`recbole_iisan.model.fused` and the gather of
  the rows (timers wrapped around them for this run); everything else (the user encoder, the loss,
  the heads' folding, autograd's own work) is the remainder of the step;
- **matmuls**: ``torch.profiler`` over the same steps; every ``mm`` / ``addmm`` / ``bmm`` call's
  self time and its FLOPs from its shapes, summed (the profiler's own overhead makes this pass a
  little slower: its shares are of the profiled step).

Writes ``<out>/step_profile.md`` (the command, the machine and both tables).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import side_levers as lev  # noqa: E402
from recbole_iisan.model import fused, states  # noqa: E402
from step_speed import ours_batch, windows  # noqa: E402

#: what the parts table times, as (owner, attribute, label, inside the previous part)
PARTS = [
    (states, "gather_rows_first", "gather the items' rows (fp16 cache -> fp32, rows first)", False),
    (fused.AdapterTerms, "forward", "weights-only products of the adapters (forward)", False),
    (fused.AdapterTerms, "backward", "weights-only products of the adapters (backward)", False),
    (fused.TowerFunction, "forward", "towers, forward", False),
    (fused.TowerFunction, "backward", "towers, backward", False),
    (fused, "_gate_grads", "of which (in the towers' backward): the gates' D-wide part and inner products", True),
]
GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


def timed(parts) -> dict:
    """Wrap each part in a CPU-second timer; returns the dict the timers add to (label -> seconds)."""
    spent: dict = {}
    for owner, name, label, _ in parts:
        fn = getattr(owner, name)
        is_static = isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod)

        def wrapper(*args, _fn=fn, _label=label, **kwargs):
            t0 = time.process_time()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.process_time() - t0
        setattr(owner, name, staticmethod(wrapper) if is_static else wrapper)
    return spent


def gemm_flops(event) -> float:
    shapes = event.input_shapes
    if event.key == "aten::mm":
        (m, k), (_, n) = shapes[0], shapes[1]
        return 2.0 * m * k * n
    if event.key == "aten::bmm":
        (b, m, k), (_, _, n) = shapes[0], shapes[1]
        return 2.0 * b * m * k * n
    (m, k), (_, n) = shapes[1], shapes[2]  # addmm(bias, a, b)
    return 2.0 * m * k * n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=20314)
    p.add_argument("--rows", type=int, default=7)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(REPO / "results" / "speed"))
    a = p.parse_args()
    torch.set_num_threads(1)
    from recbole_iisan.trainer.trainer import with_fused_kernel
    from recbole_iisan.utils.files import atomic_write_text
    from recbole_iisan.utils.tables import markdown_table

    model = lev.synthetic_model(a.items, a.rows, a.dim)
    lev.set_kernel(model, "fused")
    model.train()
    batch = ours_batch(model, *windows(a.items, a.batch, True, 1))
    opt = with_fused_kernel(torch.optim.Adam(model.param_groups(), lr=1e-4))

    def step():
        opt.zero_grad()
        model.calculate_loss(batch).backward()
        opt.step()

    for _ in range(3):
        step()
    spent = timed(PARTS)
    t0 = time.process_time()
    for _ in range(a.steps):
        step()
    total = (time.process_time() - t0) / a.steps
    rows = [{"part": label, "ms per step": f"{spent[label] / a.steps * 1e3:.1f}",
             "share": f"{spent[label] / a.steps / total:.0%}"} for _, _, label, _ in PARTS if label in spent]
    top = sum(spent[label] for _, _, label, nested in PARTS if label in spent and not nested)
    rest = total - top / a.steps
    rows += [{"part": "the rest: user encoder, loss, heads' folding, autograd", "ms per step": f"{rest * 1e3:.1f}",
              "share": f"{rest / total:.0%}"},
             {"part": "the whole step", "ms per step": f"{total * 1e3:.1f}", "share": "100%"}]

    from torch.profiler import profile
    with profile(record_shapes=True) as prof:
        for _ in range(a.steps):
            step()
    events = prof.key_averages(group_by_input_shape=True)
    profiled = sum(e.self_cpu_time_total for e in events) / 1e6 / a.steps
    gemm_s = sum(e.self_cpu_time_total for e in events if e.key in GEMMS) / 1e6 / a.steps
    gemm_f = sum(gemm_flops(e) * e.count for e in events if e.key in GEMMS) / a.steps
    peak = lev.matmul_peak()
    gemm_rows = [{"matmuls (mm, addmm, bmm)": "per step", "GFLOP": f"{gemm_f / 1e9:.2f}",
                  "ms": f"{gemm_s * 1e3:.1f}", "share of the profiled step": f"{gemm_s / profiled:.0%}",
                  "GFLOP/s": f"{gemm_f / gemm_s / 1e9:.0f}", "peak GFLOP/s (2048^3)": f"{peak:.0f}"}]

    args = " ".join(sys.argv[1:])
    header = "\n".join([
        "# Where a training step on full windows spends its time (benchmarks/step_profile.py)", "",
        "Command:", "", f"    python benchmarks/step_profile.py {args}".rstrip(), "",
        f"{a.items:,} items, {a.rows} rows x {a.dim} per tower, batch {a.batch} windows of 10 (every slot a distinct "
        f"item), IISANVS with the fused kernel, {a.steps} steps; one thread, CPU seconds; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."])
    text = header + "\n\n" + markdown_table(rows, list(rows[0])) + "\n\n" + markdown_table(gemm_rows, list(gemm_rows[0])) + "\n"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "step_profile.md", text)
    print(text)


if __name__ == "__main__":
    main()
