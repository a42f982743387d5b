"""IISAN's training step and evaluation, lever by lever, against today's implementation and the
authors' code, in one process on one CPU thread.

    python benchmarks/step_speed.py [--authors_code DIR] [--items 20314] [--rows 7] [--dim 768]
        [--batch 64] [--eval_users 4096] [--rounds 5] [--out results/speed]

The work (BERT-base / ViT-base shapes by default: 7 hidden-state rows of 768 read per tower, the
authors' 13 stored; random cached states; IISANVS under the paper protocol):

- ``train full``: one step (forward, backward, Adam) on ``--batch`` windows whose 11 slots are
  all real and all distinct (the worst case for the deduplication: every slot is a distinct item);
- ``train mixed``: the same on windows of lengths uniform in 1..10 (left-aligned, zeros after; the
  authors' left-padded, their pads run through the side network as zero states);
- ``eval``: the item table of every item plus the scores of ``--eval_users`` users (windows as in
  ``train mixed``) against it; ours in one ``full_sort_predict`` batch (``eval_batch_size`` 4096),
  the authors' as ``data_utils/metrics.py`` computes them (256 items per ``mm_encoder`` call, 256 users
  per scoring batch; see ``benchmarks/authors_iisan.py``).

Every variant runs once per round, in an order shuffled every round (the machine's other load falls
on all alike), a training variant twice in a row with the second step timed (as in training, after
a step of the same model);
the tables give the median CPU seconds (``time.process_time``, ``torch.set_num_threads(1)``), the
ratios to today's code (``side_kernel: modules``) and to the authors', the largest relative
difference of the loss, the gradients or the scores to today's (max |a - b| / max |a|), and the
achieved GFLOP/s of the side network (:func:`side_levers.side_flops`) next to the measured peak of a
2048^3 fp32 matmul on the same thread. Writes ``<out>/step_speed.md`` and ``<out>/step_speed.csv``.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import authors_iisan as authors  # noqa: E402
import side_levers as lev  # noqa: E402
from recbole_iisan.evaluator.significance import bootstrap_ci  # noqa: E402
from recbole_iisan.model import fused  # noqa: E402

L = 10


def windows(n_items: int, batch: int, full: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L+1], lengths [B])``: left-aligned windows plus their target at position ``len``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n_items - 1, generator=g)[: batch * (L + 1)].view(batch, L + 1) + 1
    if full:
        return ids, torch.full((batch,), L)
    lens = torch.randint(1, L + 1, (batch,), generator=g)
    keep = torch.arange(L + 1)[None, :] <= lens[:, None]
    return ids * keep, lens


def ours_batch(model, ids: torch.Tensor, lens: torch.Tensor) -> dict:
    seq = ids[:, :L].clone()
    seq[torch.arange(L)[None, :] >= lens[:, None]] = 0
    return {model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lens, model.POS_ITEM_ID: ids[torch.arange(len(lens)), lens]}


def authors_batch(ids: torch.Tensor, lens: torch.Tensor, images: torch.Tensor, texts: torch.Tensor):
    """Left-padded: ``[0] * (L - len) + window + [target]``, zero states for pads (their dataset)."""
    B = ids.size(0)
    src = torch.arange(L + 1)[None, :] - (L - lens)[:, None]
    left = ids.gather(1, src.clamp_min(0)) * (src >= 0)
    log_mask = (src[:, :L] >= 0).float()
    return left.reshape(-1), images[left], texts[left], log_mask, B


def user_windows(ids: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' eval windows: the last ``len`` items left-padded to L, with their log mask."""
    src = torch.arange(L)[None, :] - (L - lens)[:, None]
    return ids.gather(1, src.clamp_min(0)) * (src >= 0), (src >= 0).float()


class Bench:
    """Rounds of named callables, each round in its own shuffled order (seeded). With ``block`` > 1 a
    variant runs ``block`` times in a row per round and only the last call is timed: the
    step as it runs in training, after a step of the same model (a step that follows another variant's
    pays for the caches and heap that one left behind: ~3% of a fused training step after the modules'
    or the authors' step). CPU seconds (user + system) and minor page faults (first touches of fresh
    memory, each a trip through the kernel) per timed call."""

    def __init__(self, seed: int = 0):
        self.times: dict[str, list[float]] = {}
        self.faults: dict[str, list[int]] = {}
        self.order = random.Random(seed)

    def run(self, jobs: dict, rounds: int, block: int = 1) -> None:
        for fn in jobs.values():
            fn()  # warm-up (and compilation)
        for _ in range(rounds):
            names = list(jobs)
            self.order.shuffle(names)
            for name in names:
                fn = jobs[name]
                for _ in range(block - 1):
                    fn()  # the previous step of the same variant, untimed
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
                fn()
                self.times.setdefault(name, []).append(time.process_time() - t0)
                self.faults.setdefault(name, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])


# ------------------------------------------------------------------------------------------ variants

def variants(model, train: bool) -> dict:
    """name -> (setup, teardown, kept/dropped note); every variant differs from ``fused`` by one lever."""
    compiled, error = lev.compiled_side(model)

    pool = model.side._tower_buffers

    def kernel(name, chunk=None, gate_chunk=None, buffers=True):
        def setup():
            lev.restore_side(model)
            lev.set_kernel(model, name)
            fused.CHUNK, fused.TRAIN_CHUNK, fused.GATE_CHUNK = DEFAULT_CHUNKS
            fused.GATE_CHUNK = gate_chunk or fused.GATE_CHUNK
            if chunk:  # the pass size of the path measured: a training step's forward or the item table
                setattr(fused, "TRAIN_CHUNK" if train else "CHUNK", chunk)
            model.side._tower_buffers = pool if buffers else None
        return setup

    def replaced(forward):
        def setup():
            kernel("modules")()
            lev.install_side(model, forward)
        return setup

    out = {
        "today (side_kernel: modules)": kernel("modules"),
        "fused (default)": kernel("fused"),
    }
    if train:
        out.update({
            "fused, forward in chunks of 256": kernel("fused", 256),
            "fused, forward in chunks of 128": kernel("fused", 128),
            "fused, gates' backward in chunks of 256": kernel("fused", gate_chunk=256),
            "fused, without reused H buffers": kernel("fused", buffers=False),
        })
    else:
        out.update({"fused, towers unchunked": kernel("fused", 1 << 30),
                    "fused, towers in chunks of 128": kernel("fused", 128)})
    out.update({
        "modules + h-part bmm": replaced(lev.h_batched_side(model.side)),
        "modules, bf16 autocast (opt-in)": kernel("modules"),
    })
    if compiled is not None:
        out["modules + torch.compile"] = replaced(compiled)
    else:
        print(f"torch.compile unavailable ({error}): that lever is skipped", flush=True)
    return out


DEFAULT_CHUNKS = (fused.CHUNK, fused.TRAIN_CHUNK, fused.GATE_CHUNK)


def run_variant(name: str, setup, fn):
    setup()
    if "bf16" in name:
        with lev.bf16_autocast():
            return fn()
    return fn()


def optimizers(model) -> dict:
    """RecBole's Adam over the model's groups (today) and the trainer's (``fused_optimizer: True``)."""
    from recbole_iisan.trainer.trainer import with_fused_kernel

    return {"loop": torch.optim.Adam(model.param_groups(), lr=1e-4),
            "fused": with_fused_kernel(torch.optim.Adam(model.param_groups(), lr=1e-4))}


def train_jobs(model, batch) -> tuple[dict, dict]:
    """(timed jobs, equality results) of the training step per variant; every variant but
    ``today`` and ``..., Adam unfused`` steps the trainer's optimizer (``fused_optimizer: True``)."""
    opts = optimizers(model)

    def step(opt):
        opt.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        opt.step()

    def grads_of(name, setup):
        model.zero_grad()
        drop = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        for m, _ in drop:  # the same function in every variant: no dropout masks to match
            m.p = 0.0
        loss = run_variant(name, setup, lambda: model.calculate_loss(batch))
        loss.backward()
        for m, p in drop:
            m.p = p
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    vs = variants(model, train=True)
    vs["fused, Adam unfused"] = vs["fused (default)"]
    ref_loss, ref_grads = grads_of("today", vs["today (side_kernel: modules)"])
    diffs = {}
    for name, setup in vs.items():
        loss, grads = grads_of(name, setup)
        diffs[name] = max([lev.relative_error(ref_loss, loss)] +
                          [lev.relative_error(ref_grads[n], grads[n]) for n in ref_grads])
    diffs["fused, Adam unfused"] = diffs["fused (default)"]
    diffs["fused (default)"] = max(diffs["fused (default)"], adam_difference(model, opts))

    def opt_of(name):
        return opts["loop"] if name.startswith("today") or name.endswith("Adam unfused") else opts["fused"]
    jobs = {name: (lambda name=name, setup=setup: run_variant(name, setup, lambda: step(opt_of(name))))
            for name, setup in vs.items()}
    return jobs, diffs


def adam_difference(model, opts: dict, steps: int = 3) -> float:
    """Largest relative difference of the parameters after ``steps`` updates with the same random
    gradients by the loop and the fused Adam (each from the same start, fresh state)."""
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=g) * 1e-3 for p in model.parameters()] for _ in range(steps)]
    after = {}
    for kind, opt in opts.items():
        fresh = type(opt)(model.param_groups(), **opt.defaults)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        for gs in grads:
            for p, gr in zip(model.parameters(), gs):
                p.grad = gr.clone()
            fresh.step()
        after[kind] = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    model.zero_grad()
    return max(lev.relative_error(after["loop"][n], after["fused"][n]) for n in start)


#: training-only levers (measured there; the evaluation's towers are the same code without a backward)
EVAL_SKIP = ("modules + h-part bmm",)


def eval_jobs(model, eval_batch, table_sizes) -> tuple[dict, dict]:
    """(timed jobs, score differences): the item table (``tower_batch_size`` per variant) + the scores."""

    def scores():
        model.invalidate_item_table()
        with torch.no_grad():
            return model.full_sort_predict(eval_batch)

    model.eval()
    vs = variants(model, train=False)
    default_tbs = model.tower_batch_size  # the yaml's
    chosen = {"today (side_kernel: modules), tower_batch_size 256": ("today", vs["today (side_kernel: modules)"], 256)}
    for name, setup in vs.items():
        if name not in EVAL_SKIP and not name.startswith("today"):
            chosen[f"{name}, tower_batch_size {default_tbs}"] = (name, setup, default_tbs)
    for tbs in table_sizes:
        if tbs != default_tbs:
            chosen[f"fused (default), tower_batch_size {tbs}"] = ("fused", vs["fused (default)"], tbs)

    def job(name, setup, tbs):
        model.tower_batch_size = tbs
        return run_variant(name, setup, scores)

    ref = job(*chosen["today (side_kernel: modules), tower_batch_size 256"])
    diffs = {k: lev.relative_error(ref, job(*v)) for k, v in chosen.items()}
    return {k: (lambda v=v: job(*v)) for k, v in chosen.items()}, diffs


def authors_jobs(root, model, batches: dict, eval_ids, eval_lens, rows_read: int) -> dict:
    """The authors' model on the same windows (their layout) and the same users: name -> job."""
    torch.manual_seed(0)
    n, dim = model.n_items, model.dim_a
    am = authors.load(root, n, model.log_pop.exp().tolist())
    g = torch.Generator().manual_seed(1)
    images, texts = (torch.randn(n, authors.N_STATES, dim, generator=g) for _ in range(2))
    images[0] = texts[0] = 0
    opt = torch.optim.Adam(am.parameters(), lr=1e-4)
    jobs = {}
    for kind, (ids, lens) in batches.items():
        ids_flat, img, txt, log_mask, _ = authors_batch(ids, lens, images, texts)

        def step(ids_flat=ids_flat, img=img, txt=txt, log_mask=log_mask):
            am.train()
            authors.train_step(am, ids_flat, img, txt, log_mask, opt)
        jobs[kind] = step
    w, mask = user_windows(eval_ids, eval_lens)
    jobs["eval"] = lambda: authors.authors_scores(am, authors.authors_item_table(am, images, texts), w, mask)
    return jobs


def scoring_jobs(model, eval_batch, k: int = 10, chunks=(1024, 4096, 16384, 65536)) -> dict:
    """Scores + top-k of the users against a computed item table: at once or in item chunks."""
    from recbole_iisan.evaluator.ranking import streaming_topk

    model.eval()
    with torch.no_grad():
        table = model.item_table()
        users = model.forward(eval_batch[model.ITEM_SEQ], eval_batch[model.ITEM_SEQ_LEN])
    jobs = {"scores [users x items] + topk": lambda: torch.topk(users @ table.t(), k, dim=1)}
    for c in chunks:
        jobs[f"streaming top-k, chunks of {c} items"] = lambda c=c: streaming_topk(users, table, k, chunk_items=c)
    return jobs


# ------------------------------------------------------------------------------------------ tables

def decision(name: str, ratio_to_default: float, default: str) -> str:
    """Kept, dropped or opt-in, from the measurement (ratio of CPU time to the default's, ``default``)."""
    base = name.split(", tower_batch_size")[0]
    if base.startswith("today"):
        return "reference: today's code"
    if name == default:
        return "kept (default)"
    if base == "fused (default)":
        return f"{ratio_to_default:.2f}x the default's time"
    if "bf16" in base:
        return "opt-in (bf16 numbers)"
    if base.endswith("Adam unfused"):
        return f"fused Adam kept: without it {ratio_to_default:.2f}x the default's time"
    if base.startswith("fused, without "):
        return f"kept: without it {ratio_to_default:.2f}x the default's time"
    if ratio_to_default >= 1.05:
        return f"dropped: {ratio_to_default:.2f}x the default's time"
    if ratio_to_default >= 0.95:
        return f"not adopted: {ratio_to_default:.2f}x, within the machine's noise (5%)"
    return f"faster than the default ({ratio_to_default:.2f}x)"


def ratio_of_medians(times, base, axis=-1):
    import numpy as np

    return np.median(times, axis=axis) / np.median(base, axis=axis)


def rows_for(bench: Bench, work: str, names, today: str, authors_name, flops: dict, diffs: dict) -> list[dict]:
    rows = []
    t_today = bench.median(today)
    t_auth = bench.median(authors_name) if authors_name in bench.times else None
    default = next(n for n in names if n.startswith("fused (default)"))
    for name in names:
        t = bench.median(name)
        ci = (bootstrap_ci(bench.times[name], bench.times[authors_name], statistic=ratio_of_medians, method="percentile",
                             n_resamples=9999) if t_auth and name != authors_name else None)
        rows.append({"work": work, "variant": name, "CPU s": f"{t:.3f}", "x today": f"{t / t_today:.2f}",
                     "x authors": lev.maybe(t / t_auth if t_auth else None, "{:.3f}"),
                     "95% interval": f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "",
                     "GFLOP/s": lev.maybe(flops.get(name, 0) / t / 1e9 if flops.get(name) else None, "{:.0f}"),
                     "page faults": f"{statistics.median(bench.faults[name]):,.0f}",
                     "max rel. diff vs today": f"{diffs[name]:.1e}" if name in diffs else "",
                     "decision": "" if name == authors_name else decision(name, t / bench.median(default), default)})
    return rows


def flop_table(model, names, items: int, train: bool) -> dict:
    out = {}
    for name in names:
        f = lev.side_flops(model.side, items, train, folded=name.startswith("fused"))
        if "h-part" in name:  # the state part of the intra down-projections runs a second time
            f += _intra_down_flops(model, items, train)
        out[name] = f
    return out


def _intra_down_flops(model, items: int, train: bool) -> float:
    towers = [model.side.intra_a, model.side.intra_b]
    f = sum(2 * b.down.in_features * b.down.out_features for t in towers for b in t.blocks) * items
    return f * (3 if train else 1)


def write(rows: list[dict], header: str, out: Path) -> None:
    from recbole_iisan.utils.files import atomic_write_text
    from recbole_iisan.utils.tables import markdown_table, write_csv

    cols = list(rows[0])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "step_speed.md", header + "\n\n" + markdown_table(rows, cols) + "\n")
    write_csv(out / "step_speed.csv", rows, cols)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors_code", default=None, help="folder holding the authors' Code_Cached (not in the repo)")
    p.add_argument("--items", type=int, default=20314)
    p.add_argument("--rows", type=int, default=7)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval_users", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--eval_rounds", type=int, default=3)
    p.add_argument("--table_sizes", default="256,1024,4096,20314")
    p.add_argument("--out", default=str(REPO / "results" / "speed"))
    a = p.parse_args()
    torch.set_num_threads(1)
    model = lev.synthetic_model(a.items, a.rows, a.dim)
    batches = {"train full": windows(a.items, a.batch, True, 1), "train mixed": windows(a.items, a.batch, False, 2)}
    eval_ids, eval_lens = windows(a.items, a.eval_users, False, 3) if a.eval_users * (L + 1) < a.items else \
        _many_windows(a.items, a.eval_users, 3)
    eval_batch = ours_batch(model, eval_ids, eval_lens)
    root = authors.find(a.authors_code)
    if root is None:
        print(f"--authors_code {a.authors_code!r}: no Code_Cached/model/model.py there; the comparison with the "
              "authors' code is skipped", flush=True)
    bench, rows, diffs_all = Bench(), [], {}
    t_compile = _compile_time(model, batches["train full"])
    their = authors_jobs(root, model, batches, eval_ids, eval_lens, a.rows) if root else {}
    for work, (ids, lens) in batches.items():
        jobs, diffs = train_jobs(model, ours_batch(model, ids, lens))
        if work in their:
            jobs["authors' code"] = their[work]
        bench.times = {}
        bench.run(jobs, a.rounds, block=2)
        items = int(torch.unique(ids).numel())
        flops = flop_table(model, jobs, items, train=True)
        flops["authors' code"] = lev.side_flops(model.side, ids.numel(), True, folded=False)
        rows += rows_for(bench, work, jobs, "today (side_kernel: modules)", "authors' code", flops, diffs)
        write(rows, _header(a, t_compile), Path(a.out))
        print(f"{work} done", flush=True)
    sizes = [int(x) for x in a.table_sizes.split(",") if x]
    jobs, diffs = eval_jobs(model, eval_batch, sizes)
    if "eval" in their:
        jobs["authors' code"] = their["eval"]
    bench.times = {}
    bench.run(jobs, a.eval_rounds)
    flops = flop_table(model, jobs, a.items, train=False)
    flops["authors' code"] = lev.side_flops(model.side, a.items, False, folded=False)
    rows += rows_for(bench, "eval", jobs, "today (side_kernel: modules), tower_batch_size 256", "authors' code",
                     flops, diffs)
    bench.times = {}
    sj = scoring_jobs(model, eval_batch)
    bench.run(sj, a.rounds)
    rows += [{"work": "scoring", "variant": k, "CPU s": f"{bench.median(k):.3f}"} for k in sj]
    write(rows, _header(a, t_compile), Path(a.out))
    print(open(Path(a.out) / "step_speed.md").read())


def _many_windows(n_items: int, users: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, n_items, (users, L + 1), generator=g)
    lens = torch.randint(1, L + 1, (users,), generator=g)
    return ids * (torch.arange(L + 1)[None, :] <= lens[:, None]), lens


def _compile_time(model, batch) -> str:
    fn, error = lev.compiled_side(model)
    if fn is None:
        return f"torch.compile: unavailable ({error})"
    ids = torch.unique(batch[0])
    try:
        return f"torch.compile (inductor) of the side network: first call {lev.compile_seconds(model, fn, ids):.0f} s wall"
    except Exception as exc:  # noqa: BLE001
        return f"torch.compile: failed ({type(exc).__name__}: {str(exc)[:100]})"


def _header(a, t_compile: str) -> str:
    import platform

    args = [("--authors_code AUTHORS_CLONE" if x.startswith("--authors_code") else x) for x in sys.argv[1:]]
    if "--authors_code" in sys.argv[1:]:  # the form with a space: its value is the next argument
        i = sys.argv[1:].index("--authors_code")
        args = sys.argv[1:i + 1] + ["--authors_code AUTHORS_CLONE"] + sys.argv[i + 3:]
    cmd = "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute() else sys.argv[0]] +
                               args)
    load = os.getloadavg()
    peak32 = lev.matmul_peak()
    peak16 = lev.matmul_peak(dtype=torch.bfloat16)
    return "\n".join([
        "# Training step and evaluation speed, lever by lever (benchmarks/step_speed.py)", "",
        "Command:", "", f"    {cmd}", "",
        f"{a.items:,} items, {a.rows} rows x {a.dim} per tower (the authors: 13 stored), batch {a.batch} windows of "
        f"{L}, {a.eval_users:,} evaluation users; one thread, CPU seconds (median of {a.rounds} rounds in a shuffled order for training, each the second of two steps in a row, {a.eval_rounds} for "
        f"the evaluation); "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores.",
        f"Peak of a 2048^3 matmul on this thread: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s. {t_compile}.",
        "GFLOP/s: the side network's FLOPs as the SANBs are written (two D x r matmuls per step and item; "
        "forward, x3 for a training step) per CPU second of the whole step (the user encoder, loss and optimizer "
        "are not counted); the fused kernel does less arithmetic than that (no up-projections), so its figure is "
        "an effective rate, not the machine's. Page faults: the median minor page faults per call (first writes "
        "to fresh memory; their kernel time is part of the CPU seconds). x authors: the ratio of the medians; "
        "95% interval: its bootstrap interval over the rounds, each round's two times kept as a pair "
        "(scipy.stats.bootstrap, paired, percentile; a ratio is below a bound when the whole interval is)."])


if __name__ == "__main__":
    main()
