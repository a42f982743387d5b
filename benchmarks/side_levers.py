"""Speed levers measured by ``benchmarks/step_speed.py`` that are not the model's code: a synthetic
model on random cached states (no dataset files), the side network compiled by ``torch.compile``,
the "h part of every row in one matmul" variant of the towers, and the FLOP counts.

    model, windows = synthetic_model(n_items=20314, rows=7, dim=768)
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from recbole_iisan.model.layers import IntraTower, SideNetwork


class _SyntheticDataset:
    """What ``IISANVS`` reads from a dataset: two towers of random fp16 states ``[n_items, rows, dim]``
    (row 0, the padding item, zero), popularity targets and one window per user."""

    def __init__(self, n_items: int, rows: int, dim: int, seed: int = 0, n_users: int = 4096, L: int = 10):
        g = torch.Generator().manual_seed(seed)
        self.n_items = n_items
        self.towers = ["text", "image"]
        self.item_states = {}
        for t in self.towers:
            s = torch.randn(n_items, rows, dim, generator=g).half()
            s[0] = 0
            self.item_states[t] = s
        self.item_state_layers = {t: list(range(0, 2 * rows, 2)) for t in self.towers}
        self.encoder_depths = {t: 2 * (rows - 1) for t in self.towers}
        self.inter_feat = {"item_id": torch.randint(1, n_items, (n_users,), generator=g),
                           "item_id_list": torch.randint(1, n_items, (n_users, L), generator=g)}
        self.one_window_per_user = True

    def num(self, field: str) -> int:
        return self.n_items


def synthetic_model(n_items: int, rows: int, dim: int, seed: int = 0, **config):
    """IISANVS under the paper protocol (the authors' user encoder, loss on every position, windows
    of 10) on random states; ``config`` overrides the yaml defaults."""
    from recbole_iisan.config.configurator import build_config
    from recbole_iisan.model.iisan import IISANVS

    cfg = dict(paper_protocol=True, MAX_ITEM_LIST_LENGTH=10, use_gpu=False, data_path="/nonexistent")
    cfg.update(config)
    built = build_config("IISANVS", "Scientific", config_dict=cfg)
    torch.manual_seed(seed)
    model = IISANVS(built, _SyntheticDataset(n_items, rows, dim, seed))
    with torch.no_grad():  # gates and biases away from their initial values
        for name, p in model.named_parameters():
            if "theta" in name or name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def set_kernel(model, kernel: str) -> None:
    object.__setattr__(model.side.config, "side_kernel", kernel)


def compiled_side(model):
    """The side network's module path compiled by inductor (``torch.compile``, dynamic shapes);
    returns ``(compiled forward, None)`` or ``(None, error message)`` where it cannot compile."""
    try:
        fn = torch.compile(model.side._forward_modules, dynamic=True)
        return fn, None
    except Exception as exc:  # noqa: BLE001  (reported; the modules run instead)
        return None, f"{type(exc).__name__}: {exc}"[:120]


def install_side(model, forward) -> None:
    """Make ``model.side`` run ``forward(h_a, h_b)`` on ``[M, n, D]`` states (the modules' layout)."""
    model.side.forward = lambda h_a, h_b, rows_first_states=False: forward(h_a, h_b)


def restore_side(model) -> None:
    model.side.__dict__.pop("forward", None)


def compile_seconds(model, fn, ids: torch.Tensor) -> float:
    """Wall seconds of the first call (the compilation) on items ``ids``, forward and backward."""
    h_a, h_b = model.states(ids)
    t0 = time.perf_counter()
    fn(h_a, h_b).sum().backward()
    with torch.no_grad():
        fn(h_a, h_b)
    model.zero_grad()
    return time.perf_counter() - t0


def intra_h_batched(tower: IntraTower, h: torch.Tensor) -> torch.Tensor:
    """An intra tower with the down-projection of every row's *state* part in one batched matmul:
    ``W_j u_j = g_j W_j h_j + (1 - g_j) W_j z_{j-1}``; ``W_j h_j`` for all j is one ``bmm`` before the
    recurrence, ``W_j z_{j-1}`` stays in it (so the down-projections cost twice the FLOPs)."""
    g = tower.gates()
    wd = torch.stack([b.down.weight for b in tower.blocks])  # [n, r, D]
    ph = torch.bmm(h.transpose(0, 1), wd.transpose(1, 2))  # [n, M, r]
    z = torch.zeros_like(h[:, 0])
    for j, block in enumerate(tower.blocks):
        u = g[j] * h[:, j] + (1.0 - g[j]) * z
        pre = g[j] * ph[j] + (1.0 - g[j]) * (z @ block.down.weight.t()) + block.down.bias
        z = u + block.up(block.act(pre))
    return z


def h_batched_side(side: SideNetwork):
    """The module path with both intra towers as :func:`intra_h_batched`."""

    def forward(h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
        parts = [side.head_b(intra_h_batched(side.intra_b, h_b)), side.head_a(intra_h_batched(side.intra_a, h_a))]
        parts.append(side.head_inter(side.inter(h_a, h_b)))
        return side.fusion(torch.cat(parts, dim=-1))

    return forward


def side_flops(side: SideNetwork, items: int, train: bool, folded: bool) -> float:
    """Multiply-adds x 2 of the item side for ``items`` items (forward; x3 with the backward).
    ``folded``: the heads as one ``[d, D]`` matrix each (plus folding them once)."""
    d = side.config.embedding_size
    towers = [t for t in (side.intra_a, side.intra_b, side.inter) if t is not None]
    per_item = sum(2 * 2 * b.down.in_features * b.down.out_features for t in towers for b in t.blocks)
    heads = [h for h in (side.head_a, side.head_b, side.head_inter) if h is not None]
    fold = 0.0
    for h in heads:
        dim_in, mid = h.first.in_features, h.first.out_features
        if folded:
            per_item += 2 * dim_in * d
            fold += 2 * (d * d * mid + d * mid * dim_in)
        else:
            per_item += 2 * (dim_in * mid + mid * d) + 2 * d * d
    total = per_item * items + fold
    return total * 3 if train else total


def matmul_peak(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """GFLOP/s of an ``n x n x n`` matmul in CPU seconds (best of ``repeats``), on the current threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - t0)
    return 2 * n ** 3 / best / 1e9


def relative_error(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float((ref.float() - other.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def maybe(value: Optional[float], fmt: str = "{:.2f}") -> str:
    return "" if value is None else fmt.format(value)
