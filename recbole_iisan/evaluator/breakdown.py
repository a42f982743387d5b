"""Where the gains come from: test Hit/NDCG broken down by the target item and the user.

Three breakdowns of the test split, each a partition of the test users:

- ``target_frequency``: the target item's number of interactions in the training split
  (``0`` = never trained on, ``1-4``, ``5-19``, ``20+``);
- ``target``: ``repeat`` (the target is in the user's input sequence) or ``new``;
- ``history_length``: the length of the model's input sequence (``L+`` = the sequence is cut to
  ``MAX_ITEM_LIST_LENGTH`` = L, the user has at least L earlier interactions).

The scores are the trainer's own (``PluginTrainer._full_sort_batch_eval``: ``full_sort_predict``
with RecBole's and the protocol's masking) and the target's rank is its position in ``torch.topk``
of them, as RecBole's collector computes it (ties, e.g. items with the same text, break the same
way), so each breakdown's weighted mean is RecBole's overall metric (tested). Written into every result
file (``result["breakdown"]``), printed by ``--compare ... --breakdown`` (one table per breakdown,
and a PNG), and for a saved model by ``--recommend=CKPT --breakdown``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from recbole_iisan.data.dataset import training_frequency

FREQUENCY_BUCKETS = ((0, 0), (1, 4), (5, 19), (20, None))
LENGTH_EDGES = (1, 3, 6, 10, 20, 50)
DIMENSIONS = ("target_frequency", "target", "history_length")


def _label(lo: int, hi: Optional[int]) -> str:
    if hi is None:
        return f"{lo}+"
    return str(lo) if lo == hi else f"{lo}-{hi}"


@torch.no_grad()
def test_ranks(trainer: Any, eval_data: Any, max_k: int = 10) -> dict[str, np.ndarray]:
    """Per test example: the target's rank under the trainer's full-sort scores (``max_k + 1`` when
    it is not in the top ``max_k``), the target, and the model's input (``item_seq``, ``item_length``)."""
    model = trainer.model
    model.eval()
    trainer.tot_item_num = eval_data._dataset.item_num  # what Trainer.evaluate sets before full sorting
    ranks, targets, seqs, lengths = [], [], [], []
    for batched in eval_data:
        interaction, scores, positive_u, positive_i = trainer._full_sort_batch_eval(batched)
        scores = scores.view(-1, scores.size(-1))
        # RecBole's collector: torch.topk over the scores, the target's position in it (so ties, e.g.
        # items with the same text, break as RecBole's metrics break them); beyond max_k: max_k + 1
        _, top_idx = torch.topk(scores, max_k, dim=-1)
        match = top_idx[positive_u] == positive_i.to(top_idx.device)[:, None]
        rank = torch.where(match.any(dim=1), match.float().argmax(dim=1) + 1, torch.full_like(positive_i, max_k + 1))
        ranks.append(rank.cpu())
        targets.append(positive_i.cpu())
        seqs.append(interaction[model.ITEM_SEQ][positive_u.to(interaction[model.ITEM_SEQ].device)].cpu())
        lengths.append(interaction[model.ITEM_SEQ_LEN][positive_u.to(interaction[model.ITEM_SEQ_LEN].device)].cpu())
    width = max(s.size(1) for s in seqs)
    seqs = [torch.nn.functional.pad(s, (0, width - s.size(1))) for s in seqs]
    return {"rank": torch.cat(ranks).numpy(), "target": torch.cat(targets).numpy(),
            "item_seq": torch.cat(seqs).numpy(), "item_length": torch.cat(lengths).numpy()}


def _metrics(rank: np.ndarray, topk: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {"n": int(rank.size)}
    for k in topk:
        hit = rank <= k
        out[f"hit@{k}"] = float(hit.mean()) if rank.size else None  # strict JSON: no NaN
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0).mean()) if rank.size else None
    return out


def groups(ranks: dict[str, np.ndarray], freq: np.ndarray, max_len: int) -> dict[str, dict[str, np.ndarray]]:
    """Boolean masks over the test examples, per breakdown and bucket."""
    f = freq[ranks["target"]]
    out: dict[str, dict[str, np.ndarray]] = {"target_frequency": {}, "target": {}, "history_length": {}}
    for lo, hi in FREQUENCY_BUCKETS:
        out["target_frequency"][_label(lo, hi)] = (f >= lo) & (True if hi is None else f <= hi)
    repeat = (ranks["item_seq"] == ranks["target"][:, None]).any(axis=1)
    out["target"] = {"repeat": repeat, "new": ~repeat}
    n = ranks["item_length"]
    edges = [e for e in LENGTH_EDGES if e < max_len] + [max_len]
    for lo, nxt in zip(edges[:-1], edges[1:]):
        out["history_length"][_label(lo, nxt - 1)] = (n >= lo) & (n < nxt)
    out["history_length"][f"{max_len}+"] = n >= max_len
    return out


def compute(trainer: Any, train_data: Any, test_data: Any, topk: Optional[Sequence[int]] = None) -> dict:
    """The breakdown dict written into result files: ``{overall, target_frequency, target,
    history_length}``, each bucket ``{n, hit@k, ndcg@k}`` for the run's ``topk``."""
    config = trainer.config
    topk = list(topk or config["topk"])
    ranks = test_ranks(trainer, test_data, max(topk))
    freq = training_frequency(train_data._dataset, int(trainer.model.n_items))
    out: dict[str, Any] = {"overall": _metrics(ranks["rank"], topk)}
    for dim, buckets in groups(ranks, freq, int(config["MAX_ITEM_LIST_LENGTH"])).items():
        out[dim] = {name: _metrics(ranks["rank"][mask], topk) for name, mask in buckets.items()}
    return out


# ---------------------------------------------------------------------------------------- tables
def table_rows(results: Sequence[dict], dim: str, metric: str) -> tuple[list[str], list[dict]]:
    """``(columns, rows)``: one row per model, one column per bucket (``metric (n)``)."""
    buckets: list[str] = []
    for r in results:
        for b in (r.get("breakdown") or {}).get(dim, {}):
            if b not in buckets:
                buckets.append(b)
    rows = []
    for r in results:
        bd = (r.get("breakdown") or {}).get(dim, {})
        row = {"model": r.get("model", "?")}
        for b in buckets:
            cell = bd.get(b)
            row[b] = "" if not cell or cell.get("n", 0) == 0 else f"{cell.get(metric, float('nan')):.4f} ({cell['n']})"
        rows.append(row)
    return ["model"] + buckets, rows


def markdown(results: Sequence[dict], metric: str) -> str:
    """The ``--breakdown`` tables: ``metric`` per bucket (test users in the bucket in brackets)."""
    from recbole_iisan.utils.tables import markdown_table

    parts = []
    for dim in DIMENSIONS:
        columns, rows = table_rows(results, dim, metric)
        if len(columns) > 1:
            parts.append(f"{metric} by {dim.replace('_', ' ')}:\n{markdown_table(rows, columns)}")
    return "\n\n".join(parts)


def plot(results: Sequence[dict], metric: str, path: Union[str, Path]) -> Optional[Path]:
    """One PNG: a bar chart per breakdown, one bar per model and bucket. Written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recbole_iisan.utils.files import atomic_write_bytes

    have = [r for r in results if r.get("breakdown")]
    if not have:
        return None
    fig, axes = plt.subplots(1, len(DIMENSIONS), figsize=(5 * len(DIMENSIONS), 3.6))
    for ax, dim in zip(axes, DIMENSIONS):
        columns, _ = table_rows(have, dim, metric)
        buckets = columns[1:]
        width = 0.8 / max(1, len(have))
        for j, r in enumerate(have):
            bd = r["breakdown"].get(dim, {})
            vals = [bd.get(b, {}).get(metric, 0.0) if bd.get(b, {}).get("n", 0) else 0.0 for b in buckets]
            vals = [0.0 if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in vals]
            ax.bar(np.arange(len(buckets)) + j * width, vals, width, label=r.get("model", "?"))
        ns = [have[0]["breakdown"].get(dim, {}).get(b, {}).get("n", 0) for b in buckets]
        ax.set_xticks(np.arange(len(buckets)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{b}\n(n={n})" for b, n in zip(buckets, ns)], fontsize=8)
        ax.set_title(dim.replace("_", " "))
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())
