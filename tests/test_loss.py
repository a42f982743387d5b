"""The in-batch debiased softmax loss (IISAN-Versa, arXiv:2411.02992, Eqs. (6)-(7)) against a per-row reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from recbole_iisan.model.loss import (
    build_slots,
    full_softmax_loss,
    inbatch_softmax_loss,
    popularity_log_prob,
)


def reference_loss(query_all, slot_emb, slots, lens, log_pop, positions):
    """Straight from the description: loop over query rows, then over candidate columns."""
    B, L1 = slots.shape
    ids = [int(i) for i in slots.reshape(-1)]
    emb = slot_emb.reshape(B * L1, -1)
    losses = []
    for b in range(B):
        own = set(int(i) for i in slots[b])
        n = int(lens[b])
        js = [n - 1] if positions == "last" else list(range(n))
        for j in js:
            q = query_all[b, j]
            pos = b * L1 + j + 1
            row = []
            for c in range(B * L1):
                masked = ids[c] == 0 or ids[c] in own
                if masked and c != pos:
                    row.append(-1e4)
                else:
                    row.append(float(q @ emb[c]) - float(log_pop[ids[c]]))
            row = torch.tensor(row, dtype=torch.float64)
            losses.append(-(row[pos] - torch.logsumexp(row, 0)))
    return torch.stack(losses).mean()


def random_batch(B=5, L=6, n_items=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lens[0] = L  # a full sequence (the target lands in the extra slot)
    seq = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        seq[b, : lens[b]] = torch.randint(1, n_items, (int(lens[b]),), generator=g)
    seq[1, :2] = 3  # a repeated item within a user (if long enough)
    pos = torch.randint(1, n_items, (B,), generator=g)
    pos[2] = seq[3, 0]  # the positive of one user is another user's item
    pos[4] = seq[4, 0]  # a repeat purchase: the target already in the history
    query = torch.randn(B, L, d, generator=g)
    slots = build_slots(seq, lens, pos)
    slot_emb = torch.randn(B, L + 1, d, generator=g)
    counts = torch.randint(0, 5, (3 * n_items,), generator=g) % n_items
    log_pop = popularity_log_prob(counts, n_items)
    return query, slot_emb, slots, seq, lens, pos, log_pop


def test_build_slots_left_aligned():
    seq = torch.tensor([[5, 6, 0, 0], [1, 2, 3, 4]])
    slots = build_slots(seq, torch.tensor([2, 4]), torch.tensor([9, 8]))
    assert slots.tolist() == [[5, 6, 9, 0, 0], [1, 2, 3, 4, 8]]


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_per_row_reference(positions, seed):
    query, slot_emb, slots, seq, lens, pos, log_pop = random_batch(seed=seed)
    got = inbatch_softmax_loss(query, slot_emb, slots, lens, log_pop, positions)
    ref = reference_loss(query.double(), slot_emb.double(), slots, lens, log_pop.double(), positions)
    assert got.dtype == torch.float32
    assert torch.isclose(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_last_accepts_gathered_query():
    query, slot_emb, slots, seq, lens, pos, log_pop = random_batch()
    gathered = query[torch.arange(len(lens)), lens - 1]
    a = inbatch_softmax_loss(query, slot_emb, slots, lens, log_pop, "last")
    b = inbatch_softmax_loss(gathered, slot_emb, slots, lens, log_pop, "last")
    assert torch.allclose(a, b)


def test_equals_cross_entropy_when_items_are_distinct():
    # full sequences, every id distinct across the batch: only the user's own other slots are masked
    B, L, d = 4, 3, 5
    ids = torch.arange(1, B * (L + 1) + 1).view(B, L + 1)
    seq, pos = ids[:, :L], ids[:, L]
    lens = torch.full((B,), L)
    slots = build_slots(seq, lens, pos)
    assert torch.equal(slots, ids)
    q = torch.randn(B, d)
    emb = torch.randn(B, L + 1, d)
    log_pop = torch.zeros(B * (L + 1) + 1)
    got = inbatch_softmax_loss(q, emb, slots, lens, log_pop, "last")
    # columns: the positive first, then every slot of the other users
    rows, targets = [], []
    for b in range(B):
        cols = [emb[b, L]] + [emb[o, t] for o in range(B) if o != b for t in range(L + 1)]
        rows.append(torch.stack(cols) @ q[b])
        targets.append(0)
    want = F.cross_entropy(torch.stack(rows), torch.tensor(targets))
    assert torch.allclose(got, want, atol=1e-6)


def test_popularity_correction_is_subtracted():
    B, L, d = 2, 1, 3
    slots = torch.tensor([[1, 2], [3, 4]])
    lens = torch.tensor([1, 1])
    q = torch.randn(B, d)
    emb = torch.randn(B, L + 1, d)
    log_pop = torch.log(torch.tensor([1.0, 0.1, 0.2, 0.3, 0.4]))
    got = inbatch_softmax_loss(q, emb, slots, lens, log_pop, "last")
    # user 0: positive id 2 vs other user's ids 3, 4 (own id 1 masked)
    l0 = torch.stack([q[0] @ emb[0, 1] - log_pop[2], q[0] @ emb[1, 0] - log_pop[3], q[0] @ emb[1, 1] - log_pop[4]])
    l1 = torch.stack([q[1] @ emb[1, 1] - log_pop[4], q[1] @ emb[0, 0] - log_pop[1], q[1] @ emb[0, 1] - log_pop[2]])
    want = F.cross_entropy(torch.stack([l0, l1]), torch.tensor([0, 0]))
    assert torch.allclose(got, want, atol=1e-6)


def test_gradients_are_finite():
    query, slot_emb, slots, seq, lens, pos, log_pop = random_batch()
    query.requires_grad_(True)
    slot_emb.requires_grad_(True)
    for positions in ("last", "all"):
        loss = inbatch_softmax_loss(query, slot_emb, slots, lens, log_pop, positions)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(query.grad).all() and torch.isfinite(slot_emb.grad).all()


def test_popularity_log_prob():
    targets = torch.tensor([1, 1, 2, 3, 3, 3])
    logp = popularity_log_prob(targets, 6)
    assert logp[0] == 0  # padding: no correction
    assert math.isclose(logp[1].item(), math.log(2 / 6), rel_tol=1e-6)
    assert math.isclose(logp[3].item(), math.log(3 / 6), rel_tol=1e-6)
    # unseen items get a count of 1: finite
    assert math.isclose(logp[4].item(), math.log(1 / 6), rel_tol=1e-6)
    assert torch.isfinite(logp).all()


@pytest.mark.parametrize("positions", ["last", "all"])
def test_full_softmax_equals_cross_entropy(positions):
    query, slot_emb, slots, seq, lens, pos, log_pop = random_batch()
    table = torch.randn(12, query.size(-1))
    got = full_softmax_loss(query, table, slots, lens, positions)
    if positions == "last":
        q = query[torch.arange(len(lens)), lens - 1]
        want = F.cross_entropy(q @ table.t(), pos)
    else:
        qs, ts = [], []
        for b in range(len(lens)):
            for j in range(int(lens[b])):
                qs.append(query[b, j])
                ts.append(slots[b, j + 1])
        want = F.cross_entropy(torch.stack(qs) @ table.t(), torch.stack(ts))
    assert torch.allclose(got, want, atol=1e-6)
