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


class Tower:
    """A tower's weights prepared for one call: the down-projection with its bias as a last column
    (``[n, r, D + 1]``), the up-projection transposed with its bias as a last row (``[n, r + 1, D]``),
    the gates and ``1 - g`` as 0-dim tensors; ``kind``: ``intra`` (``u = g h + (1 - g) z``, ``add``:
    ``h + z``) or ``inter`` (``u = z + g xb + (1 - g) xa``, ``add``: ``z + xb + xa``)."""

    def __init__(self, kind: str, g: Optional[torch.Tensor], weights: Sequence[torch.Tensor]):
        n = len(weights) // 4
        self.kind, self.n = kind, n
        self.down = torch.stack([torch.cat([weights[4 * j], weights[4 * j + 1][:, None]], 1) for j in range(n)])
        self.up = torch.stack([torch.cat([weights[4 * j + 2], weights[4 * j + 3][:, None]], 1).t() for j in range(n)])
        self.w_up = [weights[4 * j + 2] for j in range(n)]
        self.w_down = [weights[4 * j] for j in range(n)]
        self.down_t = [w.t() for w in self.down.unbind(0)]
        self.ups = list(self.up.unbind(0))
        self.g = g.unbind() if g is not None else None
        self.keep = (1.0 - g).unbind() if g is not None else None

    def step_input(self, xa, xb, j: int, z: Optional[torch.Tensor], out: torch.Tensor, mix=None) -> torch.Tensor:
        """``u_j`` into ``out`` (which may be ``z``: in place; then ``inter`` needs a ``mix`` buffer);
        ``xa``, ``xb``: the rows as lists of ``[c, D]``. The forward and the backward's recomputation
        call it alike: the backward sees the very bits the forward used."""
        g = self.g[j] if self.g is not None else None
        if self.kind == "intra":
            if z is None:
                return torch.mul(xa[j], g, out=out) if g is not None else out.copy_(xa[j])
            return torch.lerp(z, xa[j], g, out=out) if g is not None else torch.add(z, xa[j], out=out)
        buf = out if z is None or out is not z else mix
        torch.lerp(xa[j], xb[j], g, out=buf) if g is not None else torch.add(xa[j], xb[j], out=buf)
        if z is None:
            return buf
        return out.add_(buf) if out is z else buf.add_(z)


def _with_ones(c: int, width: int, like: torch.Tensor, lead: tuple = ()) -> torch.Tensor:
    """``[*lead, c, width + 1]`` whose last column is 1 (the bias column of a matmul)."""
    t = like.new_empty(*lead, c, width + 1)
    t[..., width] = 1.0
    return t


def tower_forward(tw: Tower, xa: torch.Tensor, xb: Optional[torch.Tensor], keep: bool):
    """The tower's steps over ``c`` items (states ``[n, c, D]``). Returns the last state ``z [c, D]``
    and, with ``keep``, ``(A [n, c, r + 1], Z [n, c, D])``: each step's bottleneck (with the ones
    column) and state for the backward, which recomputes ``u``. Without ``keep`` one buffer holds
    ``z`` and ``u`` in turn (in place)."""
    n, c, dim = xa.shape
    r = tw.down.size(1)
    u_buf = _with_ones(c, dim, xa)
    u = u_buf[:, :dim]
    acts = _with_ones(c, r, xa, (n,) if keep else ())
    states = xa.new_empty(n, c, dim) if keep else None
    mix = xa.new_empty(c, dim) if tw.kind == "inter" and not keep else None
    xs, xbs = xa.unbind(0), xb.unbind(0) if xb is not None else None
    a_l = acts.unbind(0) if keep else [acts] * n
    pre_l = acts[..., :r].unbind(0) if keep else [acts[:, :r]] * n
    z_l = states.unbind(0) if keep else None
    z = None
    for j in range(n):
        tw.step_input(xs, xbs, j, z, out=u, mix=mix)
        torch.mm(u_buf, tw.down_t[j], out=pre_l[j]).clamp_min_(0.0)
        z = torch.addmm(u, a_l[j], tw.ups[j], out=z_l[j]) if keep else u.addmm_(a_l[j], tw.ups[j])
    return z, (acts, states)


class TowerFunction(torch.autograd.Function):
    """``y = tower(x) @ E.T`` with the tower's backward written out (gradients of the weights, the
    gates and ``E``; the states ``x`` are constants). Items go through in chunks of ``chunk`` rows
    so that a step's buffers stay in the core's cache; the weight gradients accumulate over chunks."""

    @staticmethod
    def forward(ctx, kind, chunk, xa, xb, g, out_w, *weights):
        tw, m = Tower(kind, g, weights), xa.size(1)
        y = xa.new_empty(m, out_w.size(0))
        saved = []
        for s in range(0, m, chunk):
            z, kept = tower_forward(tw, xa[:, s:s + chunk], xb[:, s:s + chunk] if xb is not None else None, keep=True)
            torch.mm(z, out_w.t(), out=y[s:s + chunk])
            saved += kept
        ctx.tower, ctx.chunk = tw, chunk
        ctx.save_for_backward(xa, xb, out_w, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        tw, chunk = ctx.tower, ctx.chunk
        xa, xb, out_w, *saved = ctx.saved_tensors
        d_down, d_up = torch.zeros_like(tw.down), torch.zeros_like(tw.up)
        d_out = torch.zeros_like(out_w)
        dots = []
        for c, s in enumerate(range(0, xa.size(1), chunk)):
            acts, states = saved[2 * c], saved[2 * c + 1]
            d_out.addmm_(dy[s:s + chunk].t(), states[-1])
            dots += _tower_backward(tw, dy[s:s + chunk] @ out_w, xa[:, s:s + chunk],
                                    xb[:, s:s + chunk] if xb is not None else None, acts, states, d_down, d_up)
        grads = []
        for j in range(tw.n):
            grads += [d_down[j, :, :-1], d_down[j, :, -1], d_up[j, :-1].t(), d_up[j, -1]]
        dg = _gate_grads(tw, dots) if tw.g is not None else None
        return (None, None, None, None, dg, d_out, *grads)


def _tower_backward(tw: Tower, dz, xa, xb, acts, states, d_down, d_up) -> list:
    """One chunk's backward, accumulating into ``d_down [n, r, D + 1]`` and ``d_up [n, r + 1, D]``;
    ``dz`` (``[c, D]``) is updated in place. Returns the gate gradients' dot products, per step
    (last first): intra ``(<du, h_j>, <du, z_{j-1}>)``, inter ``(<du, xb_j>, <du, xa_j>)``."""
    n, c, dim = xa.shape
    r = tw.down.size(1)
    u_buf = _with_ones(c, dim, dz)
    u, flat, dots = u_buf[:, :dim], dz.view(-1), []
    xs, xbs, z_l = xa.unbind(0), xb.unbind(0) if xb is not None else None, states.unbind(0)
    flat_a, flat_z = xa.reshape(n, -1).unbind(0), states.view(n, -1).unbind(0)
    flat_b = xb.reshape(n, -1).unbind(0) if xb is not None else None
    a_t, pre_l = acts.transpose(1, 2).unbind(0), acts[..., :r].unbind(0)
    d_down_l, d_up_l = d_down.unbind(0), d_up.unbind(0)
    for j in reversed(range(n)):
        z_prev = z_l[j - 1] if j else None
        tw.step_input(xs, xbs, j, z_prev, out=u)
        d_up_l[j].addmm_(a_t[j], dz)
        da = torch.ops.aten.threshold_backward(dz @ tw.w_up[j], pre_l[j], 0.0)
        d_down_l[j].addmm_(da.t(), u_buf)
        dz.addmm_(da, tw.w_down[j])
        if tw.g is None:
            continue
        if tw.kind == "intra":
            dots.append((flat.dot(flat_a[j]), flat.dot(flat_z[j - 1]) if j else None))
            if j:
                dz.mul_(tw.keep[j])
        else:
            dots.append((flat.dot(flat_b[j]), flat.dot(flat_a[j])))
    return dots


def _gate_grads(tw: Tower, dots: list) -> torch.Tensor:
    """dL/dg_j summed over the chunks: intra ``<du, h_j - z_{j-1}>``, inter ``<du, xb_j - xa_j>``."""
    n = tw.n
    out = []
    for j in range(n):
        terms = [dots[c * n + (n - 1 - j)] for c in range(len(dots) // n)]
        pos = torch.stack([t[0] for t in terms]).sum()
        neg = [t[1] for t in terms if t[1] is not None]
        out.append(pos - torch.stack(neg).sum() if neg else pos)
    return torch.stack(out)


def tower_block_weights(blocks) -> list[torch.Tensor]:
    return [t for b in blocks for t in (b.down.weight, b.down.bias, b.up.weight, b.up.bias)]


CHUNK = 128


def run_tower(kind: str, xa: torch.Tensor, xb: Optional[torch.Tensor], g: Optional[torch.Tensor],
              blocks, out_w: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """``[M, d]``: the tower over rows-first states (``[n, M, D]`` contiguous) projected by ``out_w [d, D]``."""
    weights = tower_block_weights(blocks)
    chunk = chunk or CHUNK
    if torch.is_grad_enabled() and (out_w.requires_grad or any(w.requires_grad for w in weights)):
        return TowerFunction.apply(kind, chunk, xa, xb, g, out_w, *weights)
    with torch.no_grad():
        tw = Tower(kind, g, weights)
        y = xa.new_empty(xa.size(1), out_w.size(0))
        for s in range(0, xa.size(1), chunk):
            sl = slice(s, s + chunk)
            z, _ = tower_forward(tw, xa[:, sl], xb[:, sl] if xb is not None else None, keep=False)
            torch.mm(z, out_w.t(), out=y[sl])
        return y


def fold_head(head, fusion_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E [d, D], c [d])`` with ``fusion_block @ head(x) == x @ E.T + c``: the head's two Linears
    (no nonlinearity between them) and its block of the fusion Linear as one matrix."""
    outer = fusion_block @ head.second.weight  # [d, mid]
    return outer @ head.first.weight, outer @ head.first.bias + fusion_block @ head.second.bias


def rows_first(h: torch.Tensor) -> torch.Tensor:
    """``[M, n, D]`` -> ``[n, M, D]`` contiguous, fp32 (fp64 stays fp64), in one pass."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    out = torch.empty(h.size(1), h.size(0), h.size(2), dtype=dtype, device=h.device)
    out.copy_(h.transpose(0, 1))
    return out
