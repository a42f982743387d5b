"""IISAN's training loss on RecBole batches, vectorised: the in-batch softmax with log-popularity
correction of IISAN-Versa (Fu et al., IEEE TKDE, arXiv:2411.02992), Eqs. (6)-(7), as the authors'
code computes it (github.com/GAIR-Lab/IISAN: the mean over active positions).

A RecBole training batch holds, per sample b, the left-aligned input sequence ``item_seq[b]``
(real items at positions ``0..len_b-1``, zeros after), ``item_seq_len[b]`` and the target
``pos_items[b]``.  The *slots* of sample b are its L sequence ids plus its target, laid out
left-aligned as ``slots[b] = item_seq[b, :len_b] + [pos_items[b]] + zeros`` (``[B, L+1]``), so that
the output at position j always predicts slot ``j + 1``.

In-batch softmax with log-popularity correction (the authors' loss):

1. candidate columns = all ``N = B * (L+1)`` slots of the batch (pads included, masked below);
   ``logit[q, c] = <query_q, e(slot c)> - log p[id(c)]`` (``p[0] = 1``: pads get no correction);
2. for a query row of sample b, every column whose item id occurs anywhere among b's slots is
   masked, and so is every pad column; then the row's positive column is restored;
3. cross-entropy with the positive column as target, averaged over the active query rows.

Query rows (``loss_positions``):
- ``last`` (default; RecBole's protocol, where augmentation already yields one sample per
  prefix): one row per sample, the output at position ``len_b - 1`` predicting the target;
- ``all`` (the paper's protocol, one training sequence per user): every position
  ``j < len_b`` predicts slot ``j + 1``.

``CE`` (RecBole's ``loss_type: CE``) is the full softmax over all items, see :func:`full_softmax_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_POSITIONS = ("last", "all")
LOSS_TYPES = ("inbatch", "CE")


def build_slots(item_seq: torch.Tensor, item_seq_len: torch.Tensor, pos_items: torch.Tensor) -> torch.Tensor:
    """``[B, L+1]`` slot ids: the left-aligned sequence with the target written at position ``len``."""
    B, L = item_seq.shape
    slots = item_seq.new_zeros(B, L + 1)
    slots[:, :L] = item_seq
    # positions >= len are pads in item_seq already; write the target right after the sequence
    slots[torch.arange(B, device=item_seq.device), item_seq_len.long()] = pos_items
    return slots


def popularity_log_prob(item_ids: torch.Tensor, n_items: int, min_count: float = 1.0) -> torch.Tensor:
    """``log p[i]`` for the popularity correction, ``[n_items]`` float32.

    ``count[i]`` = occurrences of item i in ``item_ids`` (the training targets); items never seen
    get ``min_count`` (default 1) so that no ``-inf`` / NaN can appear; ``p = count / sum(count of
    real items)`` and ``p[0] = 1`` so that padding gets a zero correction.
    """
    ids = item_ids.reshape(-1).long()
    counts = torch.bincount(ids, minlength=n_items)[:n_items].double()
    counts[0] = 0.0
    total = counts.sum().clamp_min(1.0)
    counts = counts.clamp_min(float(min_count))
    logp = torch.log(counts / total)
    logp[0] = 0.0
    return logp.float()


def _query_rows(query: torch.Tensor, item_seq_len: torch.Tensor, L1: int, positions: str):
    """Active query vectors, their sample index and their positive column (``b*(L+1) + j + 1``)."""
    B = item_seq_len.size(0)
    lens = item_seq_len.long()
    if positions == "last":
        if query.dim() == 3:
            q = query[torch.arange(B, device=query.device), lens - 1]
        else:
            q = query
        rows_b = torch.arange(B, device=query.device)
        pos_col = rows_b * L1 + lens
        return q, rows_b, pos_col
    if positions == "all":
        if query.dim() != 3:
            raise ValueError("loss_positions 'all' needs the user encoder output at every position [B, L, d]")
        L = query.size(1)
        active = torch.arange(L, device=query.device)[None, :] < lens[:, None]  # [B, L]
        rows_b, rows_j = active.nonzero(as_tuple=True)
        q = query[rows_b, rows_j]
        pos_col = rows_b * L1 + rows_j + 1
        return q, rows_b, pos_col
    raise ValueError(f"loss_positions: expected one of {LOSS_POSITIONS}, got {positions!r}")


def inbatch_softmax_loss(
    query: torch.Tensor,
    slot_emb: torch.Tensor,
    slots: torch.Tensor,
    item_seq_len: torch.Tensor,
    log_pop: torch.Tensor,
    positions: str = "last",
) -> torch.Tensor:
    """The authors' in-batch debiased softmax loss, vectorised (no loop over the batch).

    Args:
        query: user-encoder output, ``[B, L, d]`` (every position) or ``[B, d]`` (``last`` only).
        slot_emb: item embeddings of the slots, ``[B, L+1, d]`` (pad rows may hold anything).
        slots: slot ids from :func:`build_slots`, ``[B, L+1]``.
        item_seq_len: ``[B]`` sequence lengths (>= 1).
        log_pop: ``[n_items]`` from :func:`popularity_log_prob` (``log_pop[0] == 0``).
        positions: ``last`` or ``all`` (see the module docstring).
    Returns:
        the mean cross-entropy over the active query rows (fp32 scalar).
    """
    B, L1 = slots.shape
    ids_flat = slots.reshape(-1)  # [N]
    emb = slot_emb.reshape(B * L1, -1).float()  # [N, d]
    q, rows_b, pos_col = _query_rows(query, item_seq_len, L1, positions)
    logits = torch.addmm(log_pop.float()[ids_flat].neg()[None, :], q.float(), emb.t())  # [R, N], fp32
    # same[b, c]: the id of column c occurs among b's slots (this includes pad id 0 when b has pads).
    # Through the batch's distinct ids (U <= N): O(B*U + B*N) memory instead of O(B*(L+1)*N).
    _, inverse = torch.unique(ids_flat, return_inverse=True)
    member = torch.zeros(B, int(inverse.max()) + 1, dtype=torch.bool, device=slots.device)
    member.scatter_(1, inverse.view(B, L1), True)  # [B, U]
    same = member[:, inverse]  # [B, N]
    mask = same[rows_b] | (ids_flat == 0)[None, :]  # [R, N]
    mask[torch.arange(mask.size(0), device=mask.device), pos_col] = False
    return F.cross_entropy(logits.masked_fill_(mask, float("-inf")), pos_col)


def full_softmax_loss(
    query: torch.Tensor,
    item_table: torch.Tensor,
    slots: torch.Tensor,
    item_seq_len: torch.Tensor,
    positions: str = "last",
) -> torch.Tensor:
    """Full softmax over every item (RecBole's ``CE``): ``item_table`` is ``[n_items, d]``."""
    B, L1 = slots.shape
    q, _, pos_col = _query_rows(query, item_seq_len, L1, positions)
    target = slots.reshape(-1)[pos_col]
    logits = q.float() @ item_table.float().t()
    return F.cross_entropy(logits, target)
