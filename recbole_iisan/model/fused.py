"""The side network's towers with a hand-written backward: the same function as :mod:`.layers`, less
work (``side_kernel: fused``, the default; ``modules`` runs the ``nn.Module`` path).

What is the same: every SANB ``z = u + W_up relu(W_down u + b_down) + b_up`` of every step (IISAN,
Fu et al., SIGIR 2024, arXiv:2404.11007, Sec. 3.2-3.3), the gated (or added) inputs, the heads and
the fusion, in fp32. What differs is the order of the arithmetic (the results agree with the module
path to ~1e-6 relative, and to 1e-10 in fp64: ``tests/test_fused.py``):

- the two Linears of a head and the tower's block of the fusion Linear have no nonlinearity between
  them, so they are one ``[d, D]`` matrix ``E_t = F_t W2_t W1_t`` (plus a constant bias): an item
  costs ``D * d`` per head instead of ``D * D + D * d``;
- for the same reason the up-projections are never formed: what a SANB adds to the state
  (``W_up a + b_up``) only ever meets a later down-projection or ``E``, so a tower carries the
  states' own part ``H_j`` (the gated inputs, ``D`` wide) and the ``r``-wide activations ``a_k``,
  which reach step ``j`` through ``[r, r]`` products ``W_down_j W_up_k`` (:func:`adapter_terms`,
  computed once per call, not per item). Per step and item that is one ``D x r`` matmul in the
  forward and two in the backward instead of two and four (:class:`TowerFunction`);
- a tower reads its states rows-first (``[n_rows, M, D]``): a training step gathers its items' rows
  once into contiguous fp32 (:func:`.states.gather_rows_first`), the item table reads the cache in
  place and converts each row to fp32 into one scratch buffer as it is needed (:class:`Rows`);
- the backward keeps the weight gradients as accumulators over item chunks and takes the gate
  gradients as dot products, instead of autograd's per-op buffers;
- without gradients (the evaluation's item table) the towers step together
  (:func:`towers_in_lockstep`), so a row of the cache is converted once for all the towers that read it.
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
    """A tower's step inputs for one call: ``kind`` ``intra`` (``u = g h + (1 - g) z``, ``add``:
    ``h + z``) or ``inter`` (``u = z + g xb + (1 - g) xa``, ``add``: ``z + xb + xa``), its ``n`` gates
    as 0-dim tensors and ``1 - g`` as floats."""

    def __init__(self, kind: str, g: Optional[torch.Tensor], n: int):
        self.kind, self.n = kind, n
        self.g = g.unbind() if g is not None else None
        self.keep = (1.0 - g).tolist() if g is not None else None  # 1 - g_j as floats (addmm's beta)

    def step_input(self, xa, xb, j: int, z: Optional[torch.Tensor], out: torch.Tensor, mix=None) -> torch.Tensor:
        """``H_j`` (:class:`TowerFunction`) into ``out`` (which may be ``z``, the previous one: in place;
        then ``inter`` needs a ``mix`` buffer); ``xa``, ``xb``: the rows (:class:`Rows`)."""
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


def adapter_terms(kind: str, g: Optional[torch.Tensor], blocks, out_w: torch.Tensor) -> dict:
    """The weights-only quantities of :class:`TowerFunction` (their cost does not grow with the
    number of items; computed with autograd where gradients are taken): per step ``j`` the
    ``[j r, r]`` matrix ``K_j`` (the earlier steps' adapter outputs as step ``j``'s down-projection
    sees them) and the bias ``s_j [r]``; the ``[n r, d]`` matrix ``O`` and the bias ``s_out [d]`` of
    the output ``z_n @ E.T``.

    With ``beta_j`` the weight of ``z_{j-1}`` in ``u_j`` (``1 - g_j``; 1 without gates and in the
    inter tower) and ``c_jk = beta_{k+1} ... beta_j``:
    ``K_j = [c_jk (W_down_j W_up_k)^T]_{k<j}``, ``s_j = b_down_j + sum_{k<j} c_jk W_down_j b_up_k``,
    ``O = [c_nk (E W_up_k)^T]_k``, ``s_out = sum_k c_nk E b_up_k`` (``c_nk = beta_{k+1} ... beta_{n-1}``)."""
    n, r = len(blocks), blocks[0].down.weight.size(0)
    beta = (1.0 - g) if (kind == "intra" and g is not None) else None
    coefs: list = [None]  # coefs[j]: c_jk for k < j (None: all 1); coefs[n]: the output's
    for j in range(1, n + 1):
        if beta is None:
            coefs.append(None)
            continue
        c = torch.cat([coefs[j - 1] if coefs[j - 1] is not None else beta.new_ones(0), beta.new_ones(1)])
        coefs.append(c * beta[j] if j < n else c)
    downs = torch.cat([b.down.weight for b in blocks])  # [n r, D]
    ups = torch.cat([torch.cat([b.up.weight, b.up.bias[:, None]], dim=1) for b in blocks], dim=1)  # [D, n (r+1)]
    *pairs, outs = PairProducts.apply(downs, ups, out_w)

    def split(m: torch.Tensor, c: Optional[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[rows, k (r+1)]`` products -> (``[k r, rows]``: the ``W_up`` blocks transposed, each times
        ``c_k``; ``[rows]``: the ``b_up`` columns summed with the weights ``c_k``)."""
        m = m.view(m.size(0), k, r + 1)
        if c is not None:
            m = m * c.view(1, k, 1)
        return m[:, :, :r].permute(1, 2, 0).reshape(k * r, -1), m[:, :, r].sum(1)

    ks, ss = [downs.new_empty(0, r)], [blocks[0].down.bias]
    for j in range(1, n):
        k, q = split(pairs[j - 1], coefs[j], j)
        ks.append(k)
        ss.append(blocks[j].down.bias + q)
    o, q_out = split(outs, coefs[n], n)
    return {"K": ks, "s": ss, "O": o, "s_out": q_out}


class PairProducts(torch.autograd.Function):
    """The weight products of :func:`adapter_terms` without autograd's per-slice buffers: from
    ``downs`` (every step's ``W_down`` stacked, ``[n r, D]``), ``ups`` (every step's ``[W_up | b_up]``
    side by side, ``[D, n (r+1)]``) and ``E [d, D]``, the products ``W_down_j [W_up_k | b_up_k]`` of
    every ``k < j`` (``[r, j (r+1)]`` per ``j >= 1``) and ``E [W_up_k | b_up_k]`` of every ``k``."""

    @staticmethod
    def forward(ctx, downs, ups, out_w):
        n = ups.size(1) - downs.size(0)  # n (r+1) - n r
        r = downs.size(0) // n
        ctx.save_for_backward(downs, ups, out_w)
        ctx.r = r
        return (*[downs[j * r:(j + 1) * r] @ ups[:, : j * (r + 1)] for j in range(1, n)], out_w @ ups)

    @staticmethod
    def backward(ctx, *grads):
        downs, ups, out_w = ctx.saved_tensors
        r = ctx.r
        d_downs, d_ups = torch.zeros_like(downs), torch.zeros_like(ups)
        for j, dm in enumerate(grads[:-1], start=1):
            if dm is None:
                continue
            width = j * (r + 1)
            d_downs[j * r:(j + 1) * r].addmm_(dm, ups[:, :width].t())
            d_ups[:, :width].addmm_(downs[j * r:(j + 1) * r].t(), dm)
        d_out = None
        if grads[-1] is not None:
            d_ups.addmm_(out_w.t(), grads[-1])
            d_out = grads[-1] @ ups.t()
        return d_downs, d_ups, d_out


class TowerFunction(torch.autograd.Function):
    """``y = z_n @ E.T`` of a tower (without ``s_out``), written as its two parts: the inputs' part
    ``H_j = u_j`` without the adapters (``H_j = g_j h_j + (1 - g_j) H_{j-1}``, or ``h_j + H_{j-1}``;
    inter ``lerp(xa_j, xb_j, g_j) + H_{j-1}``), ``[c, D]``, and the adapters' part, which only ever
    meets a down-projection or ``E`` (everything after an up-projection is linear until the next
    down-projection), so it is carried as the ``r``-wide activations ``a_k`` through the
    ``[r, r]`` products of :func:`adapter_terms`:

        pre_j = H_j W_down_j^T + [a_0 .. a_{j-1}] K_j + s_j,   a_j = relu(pre_j)
        y     = H_n E^T + [a_0 .. a_{n-1}] O

    Per step and item that is one ``D x r`` matmul in the forward and two in the backward, where
    the SANB as written (``z = u + W_up a``) costs two and four: the up-projections into ``D`` are
    never formed. Items go through in chunks of ``chunk`` rows so that a step's buffers stay in the
    core's cache; the weight gradients accumulate over chunks."""

    @staticmethod
    def forward(ctx, kind, chunk, xa, xb, g, out_w, o_mat, *flat):
        n = len(flat) // 3
        tw = Tower(kind, g, n)
        downs, ss, ks = flat[0::3], flat[1::3], flat[2::3]
        m, r = xa.size(1), downs[0].size(0)
        y = out_w.new_empty(m, out_w.size(0))
        saved = []
        for s in range(0, m, chunk):
            h_l, acts = _chunk_forward(tw, xa[:, s:s + chunk], xb[:, s:s + chunk] if xb is not None else None,
                                       downs, ss, ks, r, out_w.dtype)
            torch.mm(h_l[-1], out_w.t(), out=y[s:s + chunk])
            y[s:s + chunk].addmm_(acts, o_mat)
            saved += [h_l, acts]
        ctx.tower, ctx.chunk, ctx.n = tw, chunk, n
        ctx.save_for_backward(xa, xb, out_w, o_mat, *flat, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        tw, chunk, n = ctx.tower, ctx.chunk, ctx.n
        xa, xb, out_w, o_mat, *rest = ctx.saved_tensors
        flat, saved = rest[:3 * n], rest[3 * n:]
        downs, ks = flat[0::3], flat[2::3]
        d_downs = [torch.empty_like(w) for w in downs]
        d_ss = [w.new_empty(w.size(0)) for w in downs]
        d_ks = [torch.empty_like(k) for k in ks]
        d_out, d_o = torch.empty_like(out_w), torch.empty_like(o_mat)
        dots = []
        for c, s in enumerate(range(0, xa.size(1), chunk)):
            h_l, acts = saved[2 * c], saved[2 * c + 1]
            dyc, first = dy[s:s + chunk], c == 0
            acc(first, d_out, dyc.t(), h_l[-1])
            acc(first, d_o, acts.t(), dyc)
            dots += _chunk_backward(tw, dyc @ out_w, dyc @ o_mat.t(), xa[:, s:s + chunk],
                                    xb[:, s:s + chunk] if xb is not None else None, h_l, acts, downs, ks,
                                    d_downs, d_ss, d_ks, first)
        dg = _gate_grads(tw, dots) if tw.g is not None else None
        grads = [t for j in range(n) for t in (d_downs[j], d_ss[j], d_ks[j])]
        return (None, None, None, None, dg, d_out, d_o, *grads)


def _chunk_forward(tw: "Tower", xa, xb, downs, ss, ks, r: int, dtype, keep: bool = True):
    """One chunk's ``H`` and activations ``[c, n r]`` (:class:`TowerFunction`): with ``keep`` every
    ``H_j`` (``[n, c, D]``, for the backward), else the last one (``[c, D]``, one buffer in place)."""
    n, c, dim = xa.shape
    xs, xbs = Rows(xa, dtype), Rows(xb, dtype) if xb is not None else None
    new = dict(dtype=dtype, device=xa.device)
    h_l = torch.empty(n if keep else 1, c, dim, **new)
    mix = h_l[0] if keep or tw.kind != "inter" else torch.empty(c, dim, **new)
    acts = torch.empty(c, n * r, **new)
    steps = h_l.unbind(0)  # one view per step: step_input tells "in place" by identity
    for j in range(n):
        h, prev = (steps[j], steps[j - 1] if j else None) if keep else (steps[0], steps[0] if j else None)
        _adapter_step(tw, xs, xbs, j, prev, h, h if keep else mix, downs[j], ss[j], ks[j], acts, r)
    return (h_l if keep else h_l[0]), acts


def _adapter_step(tw: "Tower", xs, xbs, j: int, prev, h, mix, down, s, k, acts, r: int) -> None:
    """Step ``j``: ``H_j`` into ``h`` (from ``prev``, ``H_{j-1}``, which may be ``h``: in place) and
    ``a_j = relu(H_j W_down_j^T + [a_0 .. a_{j-1}] K_j + s_j)`` into its columns of ``acts``."""
    tw.step_input(xs, xbs, j, prev, out=h, mix=mix)
    pre = torch.addmm(s, h, down.t())
    if j:
        pre.addmm_(acts[:, : j * r], k)
    torch.clamp_min(pre, 0.0, out=acts[:, j * r:(j + 1) * r])


def _chunk_backward(tw: "Tower", dh, d_acts, xa, xb, h_l, acts, downs, ks, d_downs, d_ss, d_ks, first: bool) -> list:
    """One chunk's backward (``dh = dL/dH_n [c, D]`` and ``d_acts = dL/d[a_0 .. a_{n-1}] [c, n r]`` from
    the output, both updated in place) into the weight gradients (written by the first chunk,
    accumulated by the others). Returns the gate gradients' dot products, per step (last first):
    intra ``(<dH_j, h_j>, <dH_j, H_{j-1}>)``, inter ``(<dH_j, xb_j>, <dH_j, xa_j>)``."""
    n = xa.size(0)
    r = downs[0].size(0)
    flat, dots = dh.view(-1), []
    xs, xbs = Rows(xa, dh.dtype), Rows(xb, dh.dtype) if xb is not None else None
    zero, scale = dh.new_zeros(()), 1.0
    for j in reversed(range(n)):
        a_j = acts[:, j * r:(j + 1) * r]
        gp = torch.ops.aten.threshold_backward(d_acts[:, j * r:(j + 1) * r], a_j, 0.0)
        acc(first, d_ss[j], gp.t(), dh.new_ones(gp.size(0)))
        if j:
            acc(first, d_ks[j], acts[:, : j * r].t(), gp)
            d_acts[:, : j * r].addmm_(gp, ks[j].t())
        acc(first, d_downs[j], gp.t(), h_l[j])
        dh.addmm_(gp, downs[j], beta=scale)  # dH_j = (1 - g_{j+1}) dH_{j+1} + dL/dpre_j W_down_j
        scale = 1.0
        if tw.g is None:
            continue
        if tw.kind == "intra":
            dots += [flat.dot(xs[j].view(-1)), flat.dot(h_l[j - 1].view(-1)) if j else zero]
            scale = tw.keep[j]
        else:
            dots += [flat.dot(xbs[j].view(-1)), flat.dot(xs[j].view(-1))]
    return dots


def acc(first: bool, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` (first chunk) or ``out += a @ b``; a 1-D ``out`` takes ``a @ b`` as a matrix-vector product."""
    if out.dim() == 1:
        torch.mv(a, b, out=out) if first else out.addmv_(a, b)
    else:
        torch.mm(a, b, out=out) if first else out.addmm_(a, b)


def _gate_grads(tw: Tower, dots: list) -> torch.Tensor:
    """dL/dg_j summed over the chunks: intra ``<dH_j, h_j - H_{j-1}>``, inter ``<dH_j, xb_j - xa_j>``."""
    d = torch.stack(dots).view(-1, tw.n, 2)  # [chunks, steps (last first), (plus, minus)]
    return (d[..., 0] - d[..., 1]).sum(0).flip(0)


CHUNK = 256  # items per pass of a tower's steps (results/speed/step_speed.md: 128, 256, unchunked)
LOCKSTEP = True  # the evaluation's towers step by step together (benchmarks/step_speed.py measures both)


def run_tower(kind: str, xa: torch.Tensor, xb: Optional[torch.Tensor], g: Optional[torch.Tensor],
              blocks, out_w: torch.Tensor, chunk: Optional[int] = None, terms: Optional[dict] = None) -> torch.Tensor:
    """``[M, d]``: the tower over rows-first states (``[n, M, D]`` contiguous) projected by ``out_w [d, D]``;
    ``terms``: its :func:`adapter_terms` if already computed (without gradients)."""
    chunk = chunk or CHUNK
    t = terms if terms is not None else adapter_terms(kind, g, blocks, out_w)
    flat = [x for j, b in enumerate(blocks) for x in (b.down.weight, t["s"][j], t["K"][j])]
    if torch.is_grad_enabled() and any(x.requires_grad for x in [out_w, t["O"], *flat]):
        return TowerFunction.apply(kind, chunk, xa, xb, g, out_w, t["O"], *flat) + t["s_out"]
    with torch.no_grad():
        tw, r = Tower(kind, g, len(blocks)), blocks[0].down.weight.size(0)
        y = t["s_out"].expand(xa.size(1), -1).clone()
        for s in range(0, xa.size(1), chunk):
            sl = slice(s, s + chunk)
            h, acts = _chunk_forward(tw, xa[:, sl], xb[:, sl] if xb is not None else None, flat[0::3], flat[1::3],
                                     flat[2::3], r, out_w.dtype, keep=False)
            y[sl].addmm_(h, out_w.t()).addmm_(acts, t["O"])
        return y


@torch.no_grad()
def towers_in_lockstep(specs: Sequence[tuple], xa: torch.Tensor, xb: torch.Tensor, bias: torch.Tensor,
                       chunk: Optional[int] = None) -> torch.Tensor:
    """Without gradients (the item table): ``sum_t tower_t(x) @ E_t.T + bias`` for towers of equal
    row counts run step by step together, ``chunk`` items at a time, so that row j of each state
    tensor is read (and converted to fp32) once for all the towers that read it. ``specs``: per
    tower ``(kind, source, g, blocks, E, terms)`` with ``source`` ``"a"``, ``"b"`` or ``"ab"`` (inter)
    and ``terms`` its :func:`adapter_terms` (or None: computed here)."""
    chunk = chunk or CHUNK
    n, dtype = xa.size(0), specs[0][4].dtype
    towers = []
    for kind, src, g, blocks, e, t in specs:
        t = t if t is not None else adapter_terms(kind, g, blocks, e)
        towers.append((Tower(kind, g, n), src, e, [b.down.weight for b in blocks], t, blocks[0].down.weight.size(0)))
        bias = bias + t["s_out"]
    y = bias.expand(xa.size(1), -1).clone()
    for s in range(0, xa.size(1), chunk):
        rows = {"a": Rows(xa[:, s:s + chunk], dtype), "b": Rows(xb[:, s:s + chunk], dtype)}
        c, dim = min(chunk, xa.size(1) - s), xa.size(2)
        hs = [torch.empty(c, dim, dtype=dtype, device=xa.device) for _ in towers]
        acts = [torch.empty(c, n * r, dtype=dtype, device=xa.device) for *_, r in towers]
        mix = torch.empty(c, dim, dtype=dtype, device=xa.device)
        for j in range(n):
            for (tw, src, e, downs, t, r), h, act in zip(towers, hs, acts):
                first, other = rows[src[0]], rows[src[-1]] if len(src) > 1 else None
                _adapter_step(tw, first, other, j, h if j else None, h, mix, downs[j], t["s"][j], t["K"][j], act, r)
        for (tw, src, e, downs, t, r), h, act in zip(towers, hs, acts):
            y[s:s + c].addmm_(h, e.t()).addmm_(act, t["O"])
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
