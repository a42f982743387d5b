"""Full ranking over every item with memory bounded by a chunk size, not by ``n_items``.

RecBole's full-sort evaluation scores ``[eval users x n_items]`` at once and its collector builds a
second matrix of the same shape (``pos_matrix``, int32) to find the positives in the top-k: 4,096
users x 1M items is 16 GB of float32 scores + 16 GB of int32. Here the users of a batch are scored
against the item table ``ranking_chunk_items`` items at a time, keeping a running top-k
(``[users, k]``), so the working set is ``users x chunk`` scores; the positives are looked up in
the top-k ids only. The metrics are RecBole's own (its ``Collector`` / ``Evaluator``, fed the
``rec.topk`` structure it builds itself), so Hit/NDCG/MRR/Recall/Precision@k come out equal to
RecBole's full-sort path (up to the order of exactly tied scores).

    vals, ids = streaming_topk(user_emb, item_table, k=10, chunk_items=65536)
    result = evaluate_full_sort_streaming(trainer, test_data, chunk_items=65536)
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

ItemSource = Union[torch.Tensor, Callable[[int, int], torch.Tensor]]


def _chunk(items: ItemSource, start: int, end: int) -> torch.Tensor:
    return items(start, end) if callable(items) else items[start:end]


@torch.no_grad()
def streaming_topk(users: torch.Tensor, items: ItemSource, k: int, chunk_items: int = 65536,
                   n_items: Optional[int] = None, exclude: Optional[torch.Tensor] = None,
                   mask_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items of each user by ``users @ items.T``, ``chunk_items`` items at a time.

    Args:
        users: ``[U, d]`` user representations.
        items: ``[N, d]`` item table, or ``fn(start, end) -> [end - start, d]`` that computes it
            chunk by chunk (then ``n_items`` is required), so the table need not exist at once.
        exclude: ``[U, L]`` item ids to rank last per user (e.g. the history under the paper's
            protocol); any value outside ``[0, N)`` is ignored.
        mask_padding: rank item 0 (RecBole's padding id) last, as RecBole's full sort does.

    Returns ``(scores [U, k], item ids [U, k])``, best first. Peak extra memory: ``U x
    (chunk_items + 2k)`` scores.
    """
    if chunk_items < 1:
        raise ValueError(f"chunk_items must be >= 1, got {chunk_items}")
    n = int(n_items if n_items is not None else items.shape[0])  # type: ignore[union-attr]
    U = users.size(0)
    k = min(int(k), n)
    best_v = torch.full((U, 0), float("-inf"), device=users.device, dtype=torch.float32)
    best_i = torch.zeros((U, 0), dtype=torch.long, device=users.device)
    rows = torch.arange(U, device=users.device).unsqueeze(1)
    for start in range(0, n, chunk_items):
        end = min(start + chunk_items, n)
        block = _chunk(items, start, end)
        scores = (users @ block.t()).float()  # [U, C]
        if mask_padding and start == 0:
            scores[:, 0] = float("-inf")
        if exclude is not None:
            local = exclude - start
            hit = (local >= 0) & (local < end - start)
            scores[rows.expand_as(local)[hit], local[hit]] = float("-inf")
        v, i = torch.topk(scores, min(k, end - start), dim=1)
        best_v = torch.cat([best_v, v], dim=1)
        best_i = torch.cat([best_i, i + start], dim=1)
        if best_v.size(1) > k:
            best_v, pos = torch.topk(best_v, k, dim=1)
            best_i = torch.gather(best_i, 1, pos)
    return best_v, best_i


def topk_hits(topk_ids: torch.Tensor, positive_u: torch.Tensor, positive_i: torch.Tensor,
              n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hits [U, k] int, positives per user [U, 1] int)`` from the positive pairs
    ``(positive_u[j], positive_i[j])`` (RecBole's row-in-batch / item-id pairs)."""
    U = topk_ids.size(0)
    device = topk_ids.device
    keys = positive_u.to(device).long() * n_items + positive_i.to(device).long()
    cand = torch.arange(U, device=device).unsqueeze(1) * n_items + topk_ids
    hits = torch.isin(cand, keys).int()
    pos_len = torch.bincount(positive_u.to(device).long(), minlength=U).view(U, 1).int()
    return hits, pos_len


def user_and_item_source(model: torch.nn.Module, interaction) -> tuple[torch.Tensor, ItemSource]:
    """``(user representations [B, d], item table)`` of a sequential model whose
    ``full_sort_predict`` is ``user @ table.T``: IISAN models (``item_table()``) and RecBole's
    SASRec-like models (``item_embedding.weight``)."""
    seq = interaction[model.ITEM_SEQ]
    seq_len = interaction[model.ITEM_SEQ_LEN]
    user = model.forward(seq, seq_len)
    if hasattr(model, "item_table"):
        return user, model.item_table()
    if hasattr(model, "item_embedding"):
        return user, model.item_embedding.weight
    raise TypeError(f"{type(model).__name__} has neither item_table() nor item_embedding: "
                    f"use RecBole's full-sort evaluation for it")


@torch.no_grad()
def evaluate_full_sort_streaming(trainer, eval_data, chunk_items: int = 65536,
                                 exclude_history: Optional[bool] = None, history=None) -> dict:
    """RecBole's ``Trainer.evaluate(eval_data, load_best_model=False)`` for full-sort data, with the
    top-k found by :func:`streaming_topk` instead of a ``[users x n_items]`` score matrix.

    Feeds RecBole's own ``Collector`` (``rec.topk``) and ``Evaluator``; in DDP it reduces like
    RecBole (``_map_reduce``). ``exclude_history`` ranks each user's input-window items last;
    ``history(interaction) -> [B, H]`` item ids (the trainer's full-history ``mask_history``) too.
    """
    model = trainer.model
    model.eval()
    collector = trainer.eval_collector
    if not collector.register.need("rec.topk") or collector.register.need("rec.meanrank") \
            or collector.register.need("rec.score"):
        raise ValueError("streaming full ranking supports top-k metrics only (Hit, NDCG, MRR, Recall, "
                         "Precision, MAP); use RecBole's evaluation for rank/score metrics")
    exclude_history = bool(exclude_history)
    n_items = eval_data._dataset.item_num
    k = max(collector.topk)
    num_sample = 0
    for batched_data in eval_data:
        interaction, history_index, positive_u, positive_i = batched_data
        num_sample += len(batched_data)
        interaction = interaction.to(trainer.device)
        user, items = user_and_item_source(model, interaction)
        exclude = interaction[model.ITEM_SEQ] if exclude_history else None
        if history is not None:
            full = history(interaction)
            if full is not None:
                full = full.to(user.device)
                exclude = full if exclude is None else torch.cat([exclude, full], dim=1)
        if history_index is not None:  # RecBole's history mask (non-sequential models)
            hist_u, hist_i = history_index
            extra = torch.full((user.size(0), int(torch.bincount(hist_u).max()) if len(hist_u) else 0), -1,
                               dtype=torch.long, device=user.device)
            if extra.numel():
                order = torch.argsort(hist_u, stable=True)
                u_sorted = hist_u[order].to(user.device)
                first = torch.searchsorted(u_sorted, u_sorted, right=False)
                slot = torch.arange(len(u_sorted), device=user.device) - first
                extra[u_sorted, slot] = hist_i[order].to(user.device).long()
            exclude = extra if exclude is None else torch.cat([exclude, extra], dim=1)
        _, ids = streaming_topk(user, items, k, chunk_items=chunk_items, n_items=n_items, exclude=exclude)
        hits, pos_len = topk_hits(ids, positive_u, positive_i, n_items)
        collector.data_struct.update_tensor("rec.topk", torch.cat([hits, pos_len], dim=1))
    collector.model_collect(model)
    result = trainer.evaluator.evaluate(collector.get_data_struct())
    if not trainer.config["single_spec"]:
        result = trainer._map_reduce(result, num_sample)
    return result


__all__ = ["evaluate_full_sort_streaming", "streaming_topk", "topk_hits", "user_and_item_source"]
