"""The side network's towers with a hand-written backward: the same math as :mod:`.layers`, fewer
passes over memory (``side_kernel: fused``, the default; ``modules`` runs the ``nn.Module`` path).

What is the same: every SANB ``z = u + W_up relu(W_down u + b_down) + b_up`` of every step, the
gated (or added) inputs, the heads and the fusion, in fp32. What differs is only the rounding order
(the results agree with the module path to ~1e-6 relative, ``tests/test_fused.py``):

- the two Linears of a head and the tower's block of the fusion Linear have no nonlinearity between
  them, so they are one ``[d, D]`` matrix ``E_t = F_t W2_t W1_t`` (plus a constant bias): an item
  costs ``D * d`` per head instead of ``D * D + D * d`` (the heads were ~40% of a training step);
- a tower reads its states rows-first (``[n_rows, M, D]``: views of the cache, no gather for the item
  table), each row converted to fp32 into one scratch buffer as it is needed (:class:`Rows`);
- the gated input is one ``lerp`` (``g h + (1 - g) z``), the residual is the up-projection's
  accumulator (``addmm_`` into the buffer that holds ``u + b_up``);
- the backward (:class:`TowerFunction`) runs each step's four matmuls with the gradient buffer
  updated in place, recomputes ``u`` instead of keeping it, and takes the gate gradients as dot
  products, instead of autograd's per-op buffers;
- without gradients (the evaluation's item table) each step is one in-place ``lerp_`` and two
  matmuls, the towers step together (:func:`towers_in_lockstep`) and the last up-projection is
  folded into the head.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

SIDE_KERNELS = ("fused", "modules")


class Rows:
    """The ``[c, D]`` rows of a chunk's states (``[n, c, D]``, possibly a strided view of the cache's
    ``[c, n, D]``, in the cache's dtype: fp16 / bf16 / fp32) in the compute dtype and contiguous: a row
    is copied (and converted) into a scratch buffer when it is asked for, unless it already is both.
    The values are the same: a conversion to fp32 is exact."""

    def __init__(self, x: torch.Tensor, dtype: torch.dtype):
        self.rows = x.unbind(0)
        same = x.dtype == dtype and all(r.is_contiguous() for r in self.rows)
        self.buf = None if same else torch.empty(x.shape[1:], dtype=dtype, device=x.device)
        self.at = None

    def __getitem__(self, j: int) -> torch.Tensor:
        if self.buf is None:
            return self.rows[j]
        if self.at != j:
            self.buf.copy_(self.rows[j])
            self.at = j
        return self.buf


class Tower:
    """A tower's weights for one call (per step ``w_down [r, D], b_down [r], w_up [D, r], b_up [D]``),
    its gates and ``1 - g`` as 0-dim tensors; ``kind``: ``intra`` (``u = g h + (1 - g) z``, ``add``:
    ``h + z``) or ``inter`` (``u = z + g xb + (1 - g) xa``, ``add``: ``z + xb + xa``)."""

    def __init__(self, kind: str, g: Optional[torch.Tensor], weights: Sequence[torch.Tensor]):
        self.kind, self.n = kind, len(weights) // 4
        self.weights = list(weights)
        self.dtype = self.weights[0].dtype
        self.w_down, self.b_down, self.w_up, self.b_up = (self.weights[i::4] for i in range(4))
        self.down_t = [w.t() for w in self.w_down]
        self.up_t = [w.t() for w in self.w_up]
        self.g = g.unbind() if g is not None else None
        self.keep = (1.0 - g).unbind() if g is not None else None

    def step_input(self, xa, xb, j: int, z: Optional[torch.Tensor], out: torch.Tensor, mix=None) -> torch.Tensor:
        """``u_j`` into ``out`` (which may be ``z``: in place; then ``inter`` needs a ``mix`` buffer);
        ``xa``, ``xb``: the rows (:class:`Rows`). The forward and the backward's recomputation call it
        alike: the backward sees the very bits the forward used."""
        g = self.g[j] if self.g is not None else None
        if self.kind == "intra":
            h = xa[j]
            if z is None:
                return torch.mul(h, g, out=out) if g is not None else out.copy_(h)
            return torch.lerp(z, h, g, out=out) if g is not None else torch.add(z, h, out=out)
        buf = out if z is None or out is not z else mix
        ha, hb = xa[j], xb[j]
        torch.lerp(ha, hb, g, out=buf) if g is not None else torch.add(ha, hb, out=buf)
        if z is None:
            return buf
        return out.add_(buf) if out is z else buf.add_(z)

    def sanb(self, j: int, u: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, z)``: ``a = relu(u W_down^T + b_down)``, ``z = u + b_up + a W_up^T`` written into
        ``out`` (which may be ``u``: in place)."""
        a = torch.addmm(self.b_down[j], u, self.down_t[j]).clamp_min_(0.0)
        z = u.add_(self.b_up[j]) if out is u else torch.add(u, self.b_up[j], out=out)
        return a, z.addmm_(a, self.up_t[j])


def tower_forward(tw: Tower, xa: torch.Tensor, xb: Optional[torch.Tensor], keep: bool):
    """The tower's steps over ``c`` items (states ``[n, c, D]``). Returns the last state ``z [c, D]``
    and, with ``keep``, each step's bottleneck ``a`` and state ``z`` for the backward (``[n, c, D]``),
    which recomputes ``u``. Without ``keep`` one buffer holds ``u`` and ``z`` in turn (in place)."""
    n, c, dim = xa.shape
    xs, xbs = Rows(xa, tw.dtype), Rows(xb, tw.dtype) if xb is not None else None
    new = dict(dtype=tw.dtype, device=xa.device)
    states = torch.empty(n, c, dim, **new) if keep else None
    z_l = states.unbind(0) if keep else None
    u = torch.empty(c, dim, **new)
    mix = torch.empty(c, dim, **new) if tw.kind == "inter" and not keep else None
    z, acts = None, []
    for j in range(n):
        tw.step_input(xs, xbs, j, z, out=u if keep or z is None else z, mix=mix)
        a, z = tw.sanb(j, u if keep or j == 0 else z, out=z_l[j] if keep else (u if j == 0 else z))
        acts.append(a)
    return z, (acts, states)


class TowerFunction(torch.autograd.Function):
    """``y = tower(x) @ E.T`` with the tower's backward written out (gradients of the weights, the
    gates and ``E``; the states ``x`` are constants). Items go through in chunks of ``chunk`` rows
    so that a step's buffers stay in the core's cache; the weight gradients accumulate over chunks."""

    @staticmethod
    def forward(ctx, kind, chunk, xa, xb, g, out_w, *weights):
        tw, m = Tower(kind, g, weights), xa.size(1)
        y = out_w.new_empty(m, out_w.size(0))
        saved = []
        for s in range(0, m, chunk):
            z, (acts, states) = tower_forward(tw, xa[:, s:s + chunk], xb[:, s:s + chunk] if xb is not None else None,
                                              keep=True)
            torch.mm(z, out_w.t(), out=y[s:s + chunk])
            saved += acts + [states]
        ctx.tower, ctx.chunk = tw, chunk
        ctx.save_for_backward(xa, xb, out_w, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        tw, chunk = ctx.tower, ctx.chunk
        xa, xb, out_w, *saved = ctx.saved_tensors
        grads = [torch.empty_like(w) for w in tw.weights]
        d_out = torch.empty_like(out_w)
        dots, n = [], tw.n
        for c, s in enumerate(range(0, xa.size(1), chunk)):
            acts, states = saved[(n + 1) * c: (n + 1) * c + n], saved[(n + 1) * c + n]
            acc(c == 0, d_out, dy[s:s + chunk].t(), states[-1])
            dots += _tower_backward(tw, dy[s:s + chunk] @ out_w, xa[:, s:s + chunk],
                                    xb[:, s:s + chunk] if xb is not None else None, acts, states, grads, c == 0)
        dg = _gate_grads(tw, dots) if tw.g is not None else None
        return (None, None, None, None, dg, d_out, *grads)


def acc(first: bool, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` (first chunk) or ``out += a @ b``; a 1-D ``out`` takes ``a @ b`` as a matrix-vector product."""
    if out.dim() == 1:
        torch.mv(a, b, out=out) if first else out.addmv_(a, b)
    else:
        torch.mm(a, b, out=out) if first else out.addmm_(a, b)


def _tower_backward(tw: Tower, dz, xa, xb, acts, states, grads, first: bool) -> list:
    """One chunk's backward into ``grads`` (per step ``w_down, b_down, w_up, b_up``, written by the
    first chunk, accumulated by the others); ``dz`` (``[c, D]``) is updated in place. Returns the gate
    gradients' dot products, per step (last first): intra ``(<du, h_j>, <du, z_{j-1}>)``, inter
    ``(<du, xb_j>, <du, xa_j>)``."""
    n, c, dim = xa.shape
    u, flat, dots = torch.empty_like(dz), dz.view(-1), []
    ones = dz.new_ones(c)
    xs, xbs, z_l = Rows(xa, dz.dtype), Rows(xb, dz.dtype) if xb is not None else None, states.unbind(0)
    flat_z = states.view(n, -1).unbind(0)
    zero = dz.new_zeros(())
    for j in reversed(range(n)):
        tw.step_input(xs, xbs, j, z_l[j - 1] if j else None, out=u)
        acc(first, grads[4 * j + 2], dz.t(), acts[j])
        acc(first, grads[4 * j + 3], dz.t(), ones)
        da = torch.ops.aten.threshold_backward(dz @ tw.w_up[j], acts[j], 0.0)
        acc(first, grads[4 * j], da.t(), u)
        acc(first, grads[4 * j + 1], da.t(), ones)
        dz.addmm_(da, tw.w_down[j])
        if tw.g is None:
            continue
        if tw.kind == "intra":
            dots += [flat.dot(xs[j].view(-1)), flat.dot(flat_z[j - 1]) if j else zero]
            if j:
                dz.mul_(tw.keep[j])
        else:
            dots += [flat.dot(xbs[j].view(-1)), flat.dot(xs[j].view(-1))]
    return dots


def _gate_grads(tw: Tower, dots: list) -> torch.Tensor:
    """dL/dg_j summed over the chunks: intra ``<du, h_j - z_{j-1}>``, inter ``<du, xb_j - xa_j>``."""
    d = torch.stack(dots).view(-1, tw.n, 2)  # [chunks, steps (last first), (plus, minus)]
    return (d[..., 0] - d[..., 1]).sum(0).flip(0)


def tower_block_weights(blocks) -> list[torch.Tensor]:
    return [t for b in blocks for t in (b.down.weight, b.down.bias, b.up.weight, b.up.bias)]


CHUNK = 256  # items per pass of a tower's steps (results/speed/step_speed.md: 128, 256, unchunked)
LOCKSTEP = True  # the evaluation's towers step by step together (benchmarks/step_speed.py measures both)


def run_tower(kind: str, xa: torch.Tensor, xb: Optional[torch.Tensor], g: Optional[torch.Tensor],
              blocks, out_w: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """``[M, d]``: the tower over rows-first states (``[n, M, D]`` contiguous) projected by ``out_w [d, D]``."""
    weights = tower_block_weights(blocks)
    chunk = chunk or CHUNK
    if torch.is_grad_enabled() and (out_w.requires_grad or any(w.requires_grad for w in weights)):
        return TowerFunction.apply(kind, chunk, xa, xb, g, out_w, *weights)
    with torch.no_grad():
        tw = Tower(kind, g, weights)
        y = out_w.new_empty(xa.size(1), out_w.size(0))
        for s in range(0, xa.size(1), chunk):
            sl = slice(s, s + chunk)
            z, _ = tower_forward(tw, xa[:, sl], xb[:, sl] if xb is not None else None, keep=False)
            torch.mm(z, out_w.t(), out=y[sl])
        return y


@torch.no_grad()
def towers_in_lockstep(specs: Sequence[tuple], xa: torch.Tensor, xb: torch.Tensor, bias: torch.Tensor,
                       chunk: Optional[int] = None) -> torch.Tensor:
    """Without gradients (the item table): ``sum_t tower_t(x) @ E_t.T + bias`` for towers of equal
    row counts run step by step together, ``chunk`` items at a time, so that row j of each state
    tensor is read (and converted to fp32) once for all the towers that read it. ``specs``: per
    tower ``(kind, source, g, blocks, E)`` with ``source`` ``"a"``, ``"b"`` or ``"ab"`` (inter).

    The last step's up-projection is folded into ``E`` (no nonlinearity between them):
    ``E z_n = E u_n + (E W_up) a_n + E b_up``, a ``[d, r]`` matrix instead of the ``[D, r]`` one."""
    chunk = chunk or CHUNK
    towers = [(Tower(kind, g, tower_block_weights(blocks)), src, e) for kind, src, g, blocks, e in specs]
    last = xa.size(0) - 1
    folded = [(e @ tw.w_up[last]).t() for tw, _, e in towers]  # [r, d]
    bias = bias + sum(e @ tw.b_up[last] for tw, _, e in towers)
    dtype = towers[0][0].dtype
    y = bias.expand(xa.size(1), -1).clone()
    for s in range(0, xa.size(1), chunk):
        rows = {"a": Rows(xa[:, s:s + chunk], dtype), "b": Rows(xb[:, s:s + chunk], dtype)}
        c, dim = min(chunk, xa.size(1) - s), xa.size(2)
        zs = [torch.empty(c, dim, dtype=dtype, device=xa.device) for _ in towers]
        mix = torch.empty(c, dim, dtype=dtype, device=xa.device)
        for j in range(xa.size(0)):
            for (tw, src, e), z, up_e in zip(towers, zs, folded):
                first, other = rows[src[0]], rows[src[-1]] if len(src) > 1 else None
                tw.step_input(first, other, j, z if j else None, out=z, mix=mix)
                if j < last:
                    tw.sanb(j, z, out=z)
                else:
                    a = torch.addmm(tw.b_down[j], z, tw.down_t[j]).clamp_min_(0.0)
                    y[s:s + c].addmm_(z, e.t()).addmm_(a, up_e)
    return y


def fold_head(head, fusion_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E [d, D], c [d])`` with ``fusion_block @ head(x) == x @ E.T + c``: the head's two Linears
    (no nonlinearity between them) and its block of the fusion Linear as one matrix."""
    outer = fusion_block @ head.second.weight  # [d, mid]
    return outer @ head.first.weight, outer @ head.first.bias + fusion_block @ head.second.bias


def rows_first(h: torch.Tensor) -> torch.Tensor:
    """``[M, n, D]`` -> ``[n, M, D]``: a view (no copy); the towers read row j of it as a ``[M, D]``
    matrix whose row stride is ``n * D`` and copy it into a contiguous buffer as they convert it."""
    return h.transpose(0, 1)
