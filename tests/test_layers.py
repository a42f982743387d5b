"""Side-network blocks: SANB, gates, intra / inter towers, heads (IISAN, arXiv:2404.02059, Sec. 3)."""
import math

import pytest
import torch

from recbole_iisan.model.layers import (
    SANB,
    Gates,
    InterTower,
    IntraTower,
    make_inter_head,
    make_tower_head,
)


def setup_function(_):
    torch.manual_seed(0)


def test_sanb_init_is_near_identity():
    block = SANB(768, 64)
    assert block.down.weight.shape == (64, 768) and block.up.weight.shape == (768, 64)
    for lin in (block.down, block.up):
        assert torch.all(lin.bias == 0)
        assert abs(lin.weight.std().item() - 0.01) < 0.001
        assert abs(lin.weight.mean().item()) < 0.001
    x = torch.randn(32, 768)
    y = block(x)
    assert y.shape == x.shape
    assert (y - x).norm() / x.norm() < 0.05  # expected ~0.016 for D=768, r=64
    n = sum(p.numel() for p in block.parameters())
    assert n == 768 * 64 + 64 + 64 * 768 + 768 == 99_136


def test_sanb_formula_and_activation():
    block = SANB(8, 4, activation="gelu")
    x = torch.randn(5, 8)
    expected = x + block.up(torch.nn.functional.gelu(block.down(x)))
    assert torch.allclose(block(x), expected)
    relu = SANB(8, 4)
    assert torch.allclose(relu(x), x + relu.up(torch.relu(relu.down(x))))
    with pytest.raises(ValueError, match="sanb_activation"):
        SANB(8, 4, activation="tanh")


def test_gates_start_at_one_half_with_temperature():
    gates = Gates(7)
    assert gates.values() == [0.5] * 7
    with torch.no_grad():
        gates.theta[0] = 0.1
    assert math.isclose(gates()[0].item(), 1 / (1 + math.exp(-1.0)), rel_tol=1e-6)


def test_intra_tower_recurrence():
    tower = IntraTower(16, 3, 4)
    assert tower.gate_values() == [0.5] * 3
    with torch.no_grad():
        tower.gates.theta.copy_(torch.tensor([0.05, -0.1, 0.2]))
    h = torch.randn(6, 3, 16)
    g = torch.sigmoid(tower.gates.theta / 0.1)
    z = torch.zeros(6, 16)
    for j in range(3):
        z = tower.blocks[j](g[j] * h[:, j] + (1 - g[j]) * z)
    assert torch.allclose(tower(h), z, atol=1e-6)
    with pytest.raises(ValueError):
        tower(torch.randn(6, 4, 16))


def test_intra_tower_add_fusion_has_no_gates():
    tower = IntraTower(16, 3, 4, fusion="add")
    assert tower.gates is None and tower.gate_values() == []
    h = torch.randn(6, 3, 16)
    z = torch.zeros(6, 16)
    for j in range(3):
        z = tower.blocks[j](h[:, j] + z)
    assert torch.allclose(tower(h), z, atol=1e-6)


def test_inter_tower_symmetric_has_no_dtl():
    inter = InterTower(16, 3, 16, 3, 4)
    assert inter.dtls is None and inter.n_steps == 3 and inter.dim == 16
    ha, hb = torch.randn(5, 3, 16), torch.randn(5, 3, 16)
    beta = torch.sigmoid(inter.gates.theta / 0.1)
    m = torch.zeros(5, 16)
    for j in range(3):
        m = inter.blocks[j](m + beta[j] * hb[:, j] + (1 - beta[j]) * ha[:, j])
    assert torch.allclose(inter(ha, hb), m, atol=1e-6)


@pytest.mark.parametrize("wide_side", ["a", "b"])
def test_inter_tower_dtl_maps_the_wider_tower(wide_side):
    da, db = (24, 16) if wide_side == "a" else (16, 24)
    inter = InterTower(da, 3, db, 3, 4)
    assert inter.dim == 16 and inter.dtl_side == wide_side
    assert len(inter.dtls) == 3 and inter.dtls[0].weight.shape == (16, 24)
    ha, hb = torch.randn(5, 3, da), torch.randn(5, 3, db)
    out = inter(ha, hb)
    assert out.shape == (5, 16)
    beta = torch.sigmoid(inter.gates.theta / 0.1)
    m = torch.zeros(5, 16)
    for j in range(3):
        xa, xb = ha[:, j], hb[:, j]
        if wide_side == "a":
            xa = inter.dtls[j](xa)
        else:
            xb = inter.dtls[j](xb)
        m = inter.blocks[j](m + beta[j] * xb + (1 - beta[j]) * xa)
    assert torch.allclose(out, m, atol=1e-6)


def test_inter_tower_pairs_the_top_rows():
    inter = InterTower(16, 5, 16, 3, 4)
    assert inter.n_steps == 3 and len(inter.blocks) == 3
    ha, hb = torch.randn(4, 5, 16), torch.randn(4, 3, 16)
    out = inter(ha, hb)
    ha2 = ha.clone()
    ha2[:, :2] = torch.randn(4, 2, 16)  # the two earliest text rows are not paired
    assert torch.allclose(inter(ha2, hb), out)
    ha2[:, 2] += 1.0
    assert not torch.allclose(inter(ha2, hb), out)
    # the image side longer: symmetric behaviour
    inter_b = InterTower(16, 2, 16, 4, 4)
    hb = torch.randn(4, 4, 16)
    out = inter_b(ha[:, :2], hb)
    hb2 = hb.clone()
    hb2[:, :2] = 0
    assert torch.allclose(inter_b(ha[:, :2], hb2), out)


def test_add_fusion_inter_tower():
    inter = InterTower(8, 2, 8, 2, 4, fusion="add")
    assert inter.gates is None and inter.gate_values() == []
    ha, hb = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    m = torch.zeros(3, 8)
    for j in range(2):
        m = inter.blocks[j](m + hb[:, j] + ha[:, j])
    assert torch.allclose(inter(ha, hb), m, atol=1e-6)


def test_heads():
    text = make_tower_head("symmetric", 768, 64, image_side=False)
    image = make_tower_head("symmetric", 768, 64, image_side=True)
    assert text.first.weight.shape == (768, 768) and text.second.weight.shape == (64, 768)
    assert torch.all(image.second.bias == 0)
    # Xavier-normal std for a 768 -> 64 Linear: sqrt(2 / (768 + 64)) = 0.049
    assert abs(image.second.weight.std().item() - math.sqrt(2 / 832)) < 0.005
    x = torch.randn(3, 768)
    assert torch.allclose(text(x), text.second(text.first(x)))  # no nonlinearity
    asym = make_tower_head("asymmetric", 1024, 64, image_side=False)
    assert asym.first.weight.shape == (64, 1024) and asym.second.weight.shape == (64, 64)
    inter = make_inter_head(768, 64)
    assert inter.first.weight.shape == (768, 768) and inter.second.weight.shape == (64, 768)
    with pytest.raises(ValueError, match="head_type"):
        make_tower_head("other", 8, 4, image_side=False)
