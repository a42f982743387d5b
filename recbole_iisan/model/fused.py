"""The side network's towers with a hand-written backward: the same math as :mod:`.layers`, fewer
passes over memory (``side_kernel: fused``, the default; ``modules`` runs the ``nn.Module`` path).

What is the same: every SANB ``z = u + W_up relu(W_down u + b_down) + b_up`` of every step, the
gated (or added) inputs, the heads and the fusion, in fp32. What differs is only the rounding order
(the results agree with the module path to ~1e-6 relative, ``tests/test_fused.py``):

- the two Linears of a head and the tower's block of the fusion Linear have no nonlinearity between
  them, so they are one ``[d, D]`` matrix ``E_t = F_t W2_t W1_t`` (plus a constant bias): an item
  costs ``D * d`` per head instead of ``D * D + D * d`` (the heads were ~40% of a training step);
- a tower keeps its rows rows-first (``[n_rows, M, D]``, one contiguous ``[M, D]`` block per step),
  gathered and converted to fp32 once;
- the gated input is one ``lerp`` (``g h + (1 - g) z``), the up-projection's bias rides in its
  matmul (a ones column), the residual is the matmul's accumulator (``addmm``);
- the backward (:class:`TowerFunction`) runs each step's four matmuls with the gradient buffer
  updated in place and the gate gradients as dot products, instead of autograd's per-op buffers;
- without gradients (the evaluation's item table) each step is one in-place ``lerp_`` and two matmuls.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

SIDE_KERNELS = ("fused", "modules")


def _step_input(kind: str, xa: torch.Tensor, xb: Optional[torch.Tensor], g: Optional[torch.Tensor], j: int,
                z: Optional[torch.Tensor], out: torch.Tensor, mix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``u_j`` written into ``out`` (which may be ``z``: in place): intra ``g h_j + (1 - g) z``
    (``add``: ``h_j + z``), inter ``z + g xb_j + (1 - g) xa_j`` (``add``: ``z + xb_j + xa_j``; in
    place it needs a ``mix`` buffer). The forward and the backward's recomputation call it alike, so
    the backward sees the very bits the forward used."""
    if kind == "intra":
        if z is None:
            return torch.mul(xa[j], g[j], out=out) if g is not None else out.copy_(xa[j])
        return torch.lerp(z, xa[j], g[j], out=out) if g is not None else torch.add(z, xa[j], out=out)
    buf = out if z is None or out is not z else mix
    if g is not None:
        torch.lerp(xa[j], xb[j], g[j], out=buf)
    else:
        torch.add(xa[j], xb[j], out=buf)
    if z is None:
        return buf
    return out.add_(buf) if out is z else buf.add_(z)


def _activation(u: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor) -> torch.Tensor:
    """``[relu(u W_down^T + b_down), 1]``: the bottleneck with a ones column for the up bias."""
    r = w_down.size(0)
    a = torch.empty(u.size(0), r + 1, dtype=u.dtype, device=u.device)
    a[:, r] = 1.0
    a[:, :r] = torch.addmm(b_down, u, w_down.t()).clamp_min_(0.0)
    return a


def _up_with_bias(w_up: torch.Tensor, b_up: torch.Tensor) -> torch.Tensor:
    """``[D, r + 1]``: the up-projection with its bias as the last column."""
    return torch.cat([w_up, b_up[:, None]], dim=1)


def up_weights(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per step ``[r + 1, D]``: the up-projection (transposed) with its bias as the last row."""
    return [_up_with_bias(weights[4 * j + 2], weights[4 * j + 3]).t() for j in range(len(weights) // 4)]


def tower_forward(kind: str, xa: torch.Tensor, xb: Optional[torch.Tensor], g: Optional[torch.Tensor],
                  weights: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], keep: bool):
    """Run a tower's steps over ``c`` items. ``weights``: per step ``w_down [r, D], b_down [r],
    w_up [D, r], b_up [D]``; ``ups``: :func:`up_weights`. Returns the last state ``z [c, D]`` and, with
    ``keep``, each step's ``(a, z)`` for the backward (``u`` is recomputed there, in a scratch buffer);
    without ``keep`` every step runs in place in one buffer."""
    n, c, dim = xa.size(0), xa.size(1), xa.size(2)
    scratch = xa.new_empty(c, dim)
    mix = xa.new_empty(c, dim) if kind == "inter" and not keep else None
    z, saved = None, []
    for j in range(n):
        u = _step_input(kind, xa, xb, g, j, z, out=scratch if keep or z is None else z, mix=mix)
        a = _activation(u, weights[4 * j], weights[4 * j + 1])
        if keep:
            z = torch.addmm(u, a, ups[j])
            saved.append((a, z))
        else:
            z = u.addmm_(a, ups[j])
    return z, saved


class TowerFunction(torch.autograd.Function):
    """``y = tower(x) @ E.T`` with the tower's backward written out (gradients of the weights, the
    gates and ``E``; the states ``x`` are constants). Items go through in chunks of ``chunk`` rows
    so that a step's buffers stay in the core's cache; the weight gradients accumulate over chunks."""

    @staticmethod
    def forward(ctx, kind, chunk, xa, xb, g, out_w, *weights):
        m = xa.size(1)
        y = xa.new_empty(m, out_w.size(0))
        saved, ups = [], up_weights(weights)
        for s in range(0, m, chunk):
            e = min(s + chunk, m)
            z, steps = tower_forward(kind, xa[:, s:e], xb[:, s:e] if xb is not None else None, g, weights, ups,
                                     keep=True)
            torch.mm(z, out_w.t(), out=y[s:e])
            saved += [t for step in steps for t in step]
        ctx.kind, ctx.chunk, ctx.n = kind, chunk, xa.size(0)
        ctx.save_for_backward(xa, xb, g, out_w, *weights, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        kind, chunk, n = ctx.kind, ctx.chunk, ctx.n
        xa, xb, g, out_w, *rest = ctx.saved_tensors
        weights, saved = rest[: 4 * n], rest[4 * n:]
        grads = [torch.zeros_like(w) for w in weights]
        d_ups = [xa.new_zeros(w.size(0), w.size(1) + 1) for w in weights[2::4]]
        d_out = torch.zeros_like(out_w)
        dg = xa.new_zeros(n) if g is not None else None
        for c, s in enumerate(range(0, xa.size(1), chunk)):
            e = min(s + chunk, xa.size(1))
            steps = [saved[2 * (c * n + j): 2 * (c * n + j) + 2] for j in range(n)]
            d_out.addmm_(dy[s:e].t(), steps[-1][1])
            _tower_backward(kind, dy[s:e] @ out_w, xa[:, s:e], xb[:, s:e] if xb is not None else None, g, weights,
                            steps, grads, d_ups, dg)
        for j, d_up in enumerate(d_ups):
            grads[4 * j + 2], grads[4 * j + 3] = d_up[:, :-1], d_up[:, -1]
        return (None, None, None, None, dg, d_out, *grads)


def _tower_backward(kind, dz, xa, xb, g, weights, steps, grads, d_ups, dg) -> None:
    """One chunk's backward, accumulating into ``grads`` (down weight and bias per step), ``d_ups``
    (``[D, r + 1]`` per step) and ``dg``; ``dz`` (``[c, D]``) is updated in place."""
    scratch = torch.empty_like(dz)
    for j in reversed(range(len(steps))):
        a = steps[j][0]
        z_prev = steps[j - 1][1] if j else None
        u = _step_input(kind, xa, xb, g, j, z_prev, out=scratch)
        w_down, w_up = weights[4 * j], weights[4 * j + 2]
        d_ups[j].addmm_(dz.t(), a)
        da = (dz @ w_up).masked_fill_(a[:, :-1] == 0, 0.0)
        grads[4 * j].addmm_(da.t(), u)
        grads[4 * j + 1].add_(da.sum(0))
        du = dz.addmm_(da, w_down)
        if g is not None:
            dg[j] += _gate_grad(kind, du, xa, xb, j, z_prev)
            if kind == "intra" and j:
                du.mul_(1.0 - g[j])


def _gate_grad(kind: str, du: torch.Tensor, xa, xb, j: int, z_prev: Optional[torch.Tensor]) -> torch.Tensor:
    """dL/dg_j: intra ``<du, h_j - z_{j-1}>``, inter ``<du, xb_j - xa_j>`` (dot products, no buffers)."""
    flat = du.view(-1)
    if kind == "intra":
        out = flat.dot(xa[j].reshape(-1))
        return out - flat.dot(z_prev.view(-1)) if z_prev is not None else out
    return flat.dot(xb[j].reshape(-1)) - flat.dot(xa[j].reshape(-1))


def tower_block_weights(blocks) -> list[torch.Tensor]:
    return [t for b in blocks for t in (b.down.weight, b.down.bias, b.up.weight, b.up.bias)]


CHUNK = 128


def run_tower(kind: str, xa: torch.Tensor, xb: Optional[torch.Tensor], g: Optional[torch.Tensor],
              blocks, out_w: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """``[M, d]``: the tower over rows-first states (``[n, M, D]`` contiguous) projected by ``out_w [d, D]``."""
    weights = tower_block_weights(blocks)
    if torch.is_grad_enabled() and (out_w.requires_grad or any(w.requires_grad for w in weights)):
        return TowerFunction.apply(kind, chunk or CHUNK, xa, xb, g, out_w, *weights)
    chunk = chunk or CHUNK
    with torch.no_grad():
        y, ups = xa.new_empty(xa.size(1), out_w.size(0)), up_weights(weights)
        for s in range(0, xa.size(1), chunk):
            sl = slice(s, s + chunk)
            z, _ = tower_forward(kind, xa[:, sl], xb[:, sl] if xb is not None else None, g, weights, ups, keep=False)
            torch.mm(z, out_w.t(), out=y[sl])
        return y


def fold_head(head, fusion_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E [d, D], c [d])`` with ``fusion_block @ head(x) == x @ E.T + c``: the head's two Linears
    (no nonlinearity between them) and its block of the fusion Linear as one matrix."""
    outer = fusion_block @ head.second.weight  # [d, mid]
    return outer @ head.first.weight, outer @ head.first.bias + fusion_block @ head.second.bias


def rows_first(h: torch.Tensor) -> torch.Tensor:
    """``[M, n, D]`` (any dtype) -> ``[n, M, D]`` fp32 contiguous, one pass."""
    out = torch.empty(h.size(1), h.size(0), h.size(2), dtype=torch.float32, device=h.device)
    out.copy_(h.transpose(0, 1))
    return out
