"""trainer/trainer.py's ``with_fused_kernel`` (``fused_optimizer: True``) against torch's per-tensor
Adam / AdamW: the same parameters after several updates, group learning rates kept."""
from __future__ import annotations

import pytest
import torch

from recbole_iisan.trainer.trainer import with_fused_kernel


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 48), (48,), (7, 3, 5), ())]


def _run(make, steps: int = 5) -> list[torch.Tensor]:
    """Parameters after ``steps`` updates with fixed gradients; two groups with different learning rates."""
    ps = _params()
    opt = make([{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-3}])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in ps]


@pytest.mark.parametrize("cls, kw", [(torch.optim.Adam, {}), (torch.optim.Adam, {"weight_decay": 0.1}),
                                     (torch.optim.AdamW, {"weight_decay": 0.1})])
def test_fused_adam_updates_as_the_per_tensor_loop(cls, kw):
    loop = _run(lambda groups: cls(groups, foreach=False, **kw))
    fused_opt = []

    def make(groups):
        fused_opt.append(with_fused_kernel(cls(groups, **kw)))
        return fused_opt[0]
    fused = _run(make)
    assert all(g["fused"] for g in fused_opt[0].param_groups)
    start = _params()
    for a, b, s in zip(loop, fused, start):
        assert not torch.equal(a, s)  # the updates moved the parameters
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_what_the_fused_kernel_does_not_take_is_left_as_it_is():
    sgd = torch.optim.SGD(_params(), lr=0.1)
    assert with_fused_kernel(sgd) is sgd
    ints = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    stepped = torch.optim.Adam(_params())
    for p in stepped.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    stepped.step()
    assert with_fused_kernel(stepped) is stepped  # its state would be lost
    assert with_fused_kernel(ints).param_groups[0]["fused"]  # float64 is a floating type the kernel takes


def test_the_fused_step_marks_the_parameters_updated():
    """Caches keyed on parameter versions (the item table, the folded heads) see the fused kernel's
    updates, which torch makes without bumping the version counters."""
    ps = _params()
    opt = with_fused_kernel(torch.optim.Adam(ps, lr=1e-2))
    for p in ps:
        p.grad = torch.ones_like(p)
    before = [p._version for p in ps]
    opt.step()
    assert all(p._version > v for p, v in zip(ps, before))
