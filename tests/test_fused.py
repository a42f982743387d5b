"""``side_kernel: fused`` (recbole_iisan/model/fused.py) against a frozen copy of the item side as it
was before it (the nn.Module path of layers.py at the time), kept here as the reference: outputs,
gradients of every parameter, the training loss, the evaluation's scores, to 1e-5 relative in fp32
and 1e-10 in fp64; and the item table shared between evaluation passes."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recbole_iisan.model import fused
from recbole_iisan.model.layers import SideNetwork, SideNetworkConfig

GATE_TEMPERATURE = 0.1


# ---------------------------------------------------------------------------- the frozen reference
def reference_side(side: SideNetwork, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
    """The item side before ``side_kernel: fused``, frozen: ``[M, n_a, D_a], [M, n_b, D_b] -> [M, d]``."""
    act = torch.relu if side.config.sanb_activation == "relu" else F.gelu

    def sanb(block, x):
        return x + F.linear(act(F.linear(x, block.down.weight, block.down.bias)), block.up.weight, block.up.bias)

    def gates(tower):
        return torch.sigmoid(tower.gates.theta / GATE_TEMPERATURE) if tower.gates is not None else None

    def intra(tower, h):
        g, z = gates(tower), torch.zeros_like(h[:, 0])
        for j, block in enumerate(tower.blocks):
            x = h[:, j]
            z = sanb(block, g[j] * x + (1.0 - g[j]) * z if g is not None else x + z)
        return z

    def inter(tower, h_a, h_b):
        n, g = tower.n_steps, gates(tower)
        off_a, off_b = h_a.size(1) - n, h_b.size(1) - n
        m = h_a.new_zeros(h_a.size(0), tower.dim)
        for j, block in enumerate(tower.blocks):
            xa, xb = h_a[:, off_a + j], h_b[:, off_b + j]
            if tower.dtl_side == "a":
                xa = F.linear(xa, tower.dtls[j].weight, tower.dtls[j].bias)
            elif tower.dtl_side == "b":
                xb = F.linear(xb, tower.dtls[j].weight, tower.dtls[j].bias)
            m = sanb(block, m + (g[j] * xb + (1.0 - g[j]) * xa if g is not None else xb + xa))
        return m

    def head(hd, x):
        return F.linear(F.linear(x, hd.first.weight, hd.first.bias), hd.second.weight, hd.second.bias)

    if side.frozen_backbone:
        parts = [head(side.head_b, h_b[:, -1]), head(side.head_a, h_a[:, -1])]
    else:
        parts = []
        if side.intra_a is not None:
            parts += [head(side.head_b, intra(side.intra_b, h_b)), head(side.head_a, intra(side.intra_a, h_a))]
        if side.inter is not None:
            parts.append(head(side.head_inter, inter(side.inter, h_a, h_b)))
    return F.linear(torch.cat(parts, dim=-1), side.fusion.weight, side.fusion.bias)


def rel(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float((ref - other).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------- side network
def make_side(dtype=torch.float32, seed=0, **kw) -> SideNetwork:
    cfg = dict(dim_a=48, n_a=5, dim_b=48, n_b=5, embedding_size=16, sanb_size=12, inter_sanb_size=None,
               sanb_activation="relu", head_type="symmetric", modality="intra_inter", fusion="gated",
               frozen_backbone=False)
    cfg.update(kw)
    torch.manual_seed(seed)
    side = SideNetwork(SideNetworkConfig(**cfg)).to(dtype)
    with torch.no_grad():  # gates away from 1/2, non-zero biases, weights large enough to matter
        for name, p in side.named_parameters():
            if "theta" in name:
                p.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "blocks" in name:
                p.normal_(0.0, 0.1)
    return side


def states(side: SideNetwork, m: int, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = side.config
    return (torch.randn(m, c.n_a, c.dim_a, generator=g).to(dtype), torch.randn(m, c.n_b, c.dim_b, generator=g).to(dtype))


def outputs_and_grads(side, fn, h_a, h_b, seed=2):
    side.zero_grad()
    out = fn(h_a, h_b)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in side.named_parameters() if p.grad is not None}


CASES = {
    "VS gated": {},
    "add fusion": dict(fusion="add"),
    "intra only": dict(modality="intra"),
    "inter only": dict(modality="inter"),
    "asymmetric heads": dict(head_type="asymmetric"),
    "rows 6 and 4 (top-aligned inter)": dict(n_a=6, n_b=4, head_type="asymmetric"),
    "inter bottleneck 8": dict(inter_sanb_size=8),
    "widths 64 and 48 (DTLs: the inter tower as modules)": dict(dim_a=64, n_a=6, n_b=4, head_type="asymmetric"),
}


LAYOUTS = {  # how the side network receives the states: as the modules do, or as a training step gathers them
    "[M, n, D]": None,
    "rows first": lambda a, b: (a.transpose(0, 1).contiguous(), b.transpose(0, 1).contiguous()),
}


def side_on(side: SideNetwork, layout: str):
    if LAYOUTS[layout] is None:
        return side
    return lambda a, b: side(*LAYOUTS[layout](a, b), rows_first_states=True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [7, 128, None])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_side_network_matches_the_reference(case, chunk, layout, monkeypatch):
    if chunk is not None:  # None: the defaults (the training forward in one pass, the gates' backward in 128s)
        for name in ("CHUNK", "TRAIN_CHUNK", "GATE_CHUNK"):
            monkeypatch.setattr(fused, name, chunk)
    side = make_side(**CASES[case])
    assert side.fused
    h_a, h_b = states(side, 301)
    ref, ref_grads = outputs_and_grads(side, lambda a, b: reference_side(side, a, b), h_a, h_b)
    out, grads = outputs_and_grads(side, side_on(side, layout), h_a, h_b)
    assert rel(ref, out) < 1e-5
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        assert rel(ref_grads[name], grads[name]) < 1e-5, name


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [50, None])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_side_network_is_the_same_math_in_fp64(case, chunk, layout, monkeypatch):
    if chunk is not None:
        for name in ("CHUNK", "TRAIN_CHUNK", "GATE_CHUNK"):
            monkeypatch.setattr(fused, name, chunk)
    side = make_side(torch.float64, **CASES[case])
    h_a, h_b = states(side, 120, torch.float64)
    ref, ref_grads = outputs_and_grads(side, lambda a, b: reference_side(side, a, b), h_a, h_b)
    out, grads = outputs_and_grads(side, side_on(side, layout), h_a, h_b)
    assert rel(ref, out) < 1e-10
    for name in ref_grads:
        assert rel(ref_grads[name], grads[name]) < 1e-10, name


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lockstep", [True, False])
def test_the_item_table_path_matches_the_reference(case, lockstep, monkeypatch):
    """Without gradients (the item table) the towers run step by step together or one by one."""
    monkeypatch.setattr(fused, "LOCKSTEP", lockstep)
    monkeypatch.setattr(fused, "CHUNK", 64)
    side = make_side(**CASES[case])
    h_a, h_b = states(side, 150)
    with torch.no_grad():
        ref = reference_side(side, h_a, h_b)
        out = side(h_a, h_b)
    assert rel(ref, out) < 1e-5


GATE_SETTINGS = {  # theta / temperature: gates of 0.02 and 0.98 (the backward divides by g or 1 - g, or not)
    "all near 0": [-0.4],
    "all near 1": [0.4],
    "alternating": [-0.4, 0.4],
    "at the switch points (1/4, 1/2)": [-0.1098612, 0.0],
}


@pytest.mark.parametrize("gates", list(GATE_SETTINGS))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_gate_gradients_at_extreme_gates(gates, dtype, tol):
    """The gates' gradients take some inner products from bottleneck-wide ones and divide by ``g`` or
    ``1 - g`` where that keeps precision (fused._gate_grads): gates near 0 and 1 against the reference."""
    side = make_side(dtype)
    with torch.no_grad():
        for name, p in side.named_parameters():
            if "theta" in name:
                values = GATE_SETTINGS[gates]
                p.copy_(torch.tensor([values[i % len(values)] for i in range(p.numel())], dtype=dtype))
    h_a, h_b = states(side, 200, dtype)
    ref, ref_grads = outputs_and_grads(side, lambda a, b: reference_side(side, a, b), h_a, h_b)
    _, grads = outputs_and_grads(side, side_on(side, "rows first"), h_a, h_b)
    for name in ref_grads:
        assert rel(ref_grads[name], grads[name]) < tol, name


def test_no_grad_path_equals_the_training_path():
    side = make_side()
    h_a, h_b = states(side, 200)
    with torch.no_grad():
        evaluated = side(h_a, h_b)
    trained = side(h_a, h_b)
    assert trained.requires_grad
    assert rel(trained.detach(), evaluated) < 1e-6
    with torch.no_grad():
        again = side(*(fused.rows_first(h) for h in (h_a, h_b)), rows_first_states=True)
    assert torch.equal(evaluated, again)


@pytest.mark.parametrize("kw", [dict(sanb_activation="gelu"), dict(frozen_backbone=True), dict(side_kernel="modules")])
def test_what_the_fused_kernel_does_not_cover_runs_the_modules(kw):
    side = make_side(**kw)
    assert not side.fused
    h_a, h_b = states(side, 40)
    ref, ref_grads = outputs_and_grads(side, lambda a, b: reference_side(side, a, b), h_a, h_b)
    out, grads = outputs_and_grads(side, side, h_a, h_b)
    assert rel(ref, out) < 1e-6
    for name in ref_grads:
        assert rel(ref_grads[name], grads[name]) < 1e-6, name


def test_folded_heads_are_cached_only_without_gradients():
    side = make_side()
    with torch.no_grad():
        first = side.folded()
        assert side.folded() is first
        side.fusion.bias.add_(1.0)  # an in-place change (an optimizer step) makes a new fold
        assert side.folded() is not first
    assert side.folded()[1].requires_grad


# ---------------------------------------------------------------------------- the whole model
from test_iisan_model import attach_states, make_config  # noqa: E402
from test_iisan_model import _write_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_data(tmp_path_factory):
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_iisan.data.dataset import ProtocolSequentialDataset
    from recbole_iisan.model.iisan import IISANVS

    root = tmp_path_factory.mktemp("fused")
    _write_tiny(root)
    config = make_config(root, IISANVS, hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    init_seed(config["seed"], True)
    ds = ProtocolSequentialDataset(config)
    attach_states(ds, dims=(40, 40), rows=(5, 5))
    train, valid, _ = data_preparation(config, ds)
    return root, ds, train, valid


def _model(data, **overrides):
    from recbole.utils import init_seed

    from recbole_iisan.model.iisan import IISANVS

    root, ds, _, _ = data
    config = make_config(root, IISANVS, hidden_dropout_prob=0.0, attn_dropout_prob=0.0, **overrides)
    init_seed(2020, True)
    model = IISANVS(config, ds)
    with torch.no_grad():
        for name, p in model.side.named_parameters():
            if "theta" in name or name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


def _with_reference(model):
    """A copy whose item side is the frozen reference."""
    ref = copy.deepcopy(model)

    def forward(h_a, h_b, rows_first_states=False):
        if rows_first_states:
            h_a, h_b = h_a.transpose(0, 1), h_b.transpose(0, 1)
        return reference_side(ref.side, h_a.float(), h_b.float())

    ref.side.forward = forward
    return ref


@pytest.mark.parametrize("protocol", [{}, {"paper_protocol": True}])
def test_loss_gradients_and_scores_match_the_reference(tiny_model_data, protocol):
    model = _model(tiny_model_data, **protocol)
    ref = _with_reference(model)
    assert model.side.fused
    interaction = next(iter(tiny_model_data[2]))
    for m in (model, ref):
        m.train()
        m.zero_grad()
        m.loss = m.calculate_loss(interaction)
        m.loss.backward()
    assert rel(ref.loss.detach(), model.loss.detach()) < 1e-5
    grads = dict(ref.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        r = grads[name].grad
        if float(r.abs().max()) < 1e-7 * scale:
            # zero in exact arithmetic (e.g. RecBole's attention key bias: softmax ignores a shift of
            # every logit): both are rounding noise
            assert float(p.grad.abs().max()) < 1e-7 * scale, name
        else:
            assert rel(r, p.grad) < 1e-5, name
    batch = next(iter(tiny_model_data[3]))[0]
    for m in (model, ref):
        m.eval()
    with torch.no_grad():
        assert rel(ref.full_sort_predict(batch), model.full_sort_predict(batch)) < 1e-5
        assert rel(ref.compute_item_table(), model.compute_item_table()) < 1e-5


def test_item_table_is_shared_between_evaluation_passes(tiny_model_data):
    model = _model(tiny_model_data)
    calls = []
    original = model.compute_item_table
    model.compute_item_table = lambda: calls.append(1) or original()
    model.eval()
    first = model.item_table()
    model.eval()  # the test pass after the validation pass: same parameters, same table
    assert model.item_table() is first and len(calls) == 1
    model.load_state_dict(copy.deepcopy(model.state_dict()))  # the best epoch is the last one
    assert model.item_table() is first and len(calls) == 1
    changed = copy.deepcopy(model.state_dict())
    changed["side.fusion.bias"] += 1.0
    model.load_state_dict(changed)
    assert model.item_table() is not first and len(calls) == 2
    with torch.no_grad():
        model.side.fusion.bias.add_(1.0)  # an optimizer step
    model.item_table()
    assert len(calls) == 3
    model.train()
    assert model._item_table is None


def test_gathered_rows_are_reused_only_when_no_graph_holds_them(tiny_model_data):
    """A training step's gathered rows and the states its towers keep come from reused buffers: two
    batches' losses built before
    one backward (gradient accumulation), and a graph kept with ``retain_graph`` across another
    step, give the gradients of the same computation without reuse (fresh buffers every time)."""
    batches = [b for _, b in zip(range(2), tiny_model_data[2])]

    def grads(model, pooled: bool):
        if not pooled:  # fresh memory for the gathered rows and for what the towers' backward keeps
            model.states._row_buffers = None
            model.side._tower_buffers = None
        model.train()
        model.zero_grad()
        losses = [model.calculate_loss(b) for b in batches]  # both graphs alive at once
        sum(losses).backward(retain_graph=True)
        first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.calculate_loss(batches[1]).backward()  # another step while the first graph is kept
        model.zero_grad()
        losses[0].backward()  # the kept graph: its saved rows must be unchanged
        again = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return first, again

    pooled, fresh = grads(_model(tiny_model_data), True), grads(_model(tiny_model_data), False)
    for got, want in zip(pooled, fresh):
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name


def test_a_reused_buffer_is_not_handed_out_while_held():
    from recbole_iisan.utils.buffers import ReusedBuffers

    pool = ReusedBuffers(keep=3)
    a = pool.take((3, 4), torch.float32, "cpu")
    b = pool.take((3, 4), torch.float32, "cpu")
    assert a.data_ptr() != b.data_ptr()  # a is still held
    ptr = a.data_ptr()
    saved = a[1]  # a view keeps the storage too
    del a
    assert pool.take((3, 4), torch.float32, "cpu").data_ptr() not in (ptr, b.data_ptr())
    del saved
    assert pool.take((2, 4), torch.float32, "cpu").data_ptr() == ptr  # free again, and large enough
    assert copy.deepcopy(pool).items == []
