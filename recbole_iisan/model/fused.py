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
  computed once per call, not per item, as one autograd node: :class:`AdapterTerms`). Per step and
  item that is one ``D x r`` matmul in the forward and two in the backward instead of two and four
  (:class:`TowerFunction`);
- a tower reads its states rows-first (``[n_rows, M, D]``): a training step gathers its items' rows
  once into contiguous fp32 (:func:`.states.gather_rows_first`), the item table reads the cache in
  place and converts each row to fp32 into one scratch buffer as it is needed (:class:`Rows`);
- the backward runs the ``r``-wide part (``dL/dpre_j``, step by step) over all items at once, and
  from it every weight gradient as one matmul; the ``D``-wide ``dL/dH_j``, which only the gates
  need, runs chunk by chunk, and of the inner products they take, those with ``H_j`` itself come
  from ``r``-wide ones, so a step reads one or two ``D``-wide rows, not three (:func:`_gate_grads`);
- what the backward keeps (every step's ``H``, the largest tensor of a step) is a buffer reused
  from step to step (:class:`~recbole_iisan.utils.buffers.ReusedBuffers`), not fresh memory whose
  first writes cost page faults;
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
        self.values = g.tolist() if g is not None else None  # g_j as floats
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
    number of items): per step ``j`` the ``[j r, r]`` matrix ``K_j`` (the earlier steps' adapter
    outputs as step ``j``'s down-projection sees them) and the bias ``s_j [r]``; the ``[n r, d]``
    matrix ``O`` and the bias ``s_out [d]`` of the output ``z_n @ E.T``.

    With ``beta_j`` the weight of ``z_{j-1}`` in ``u_j`` (``1 - g_j``; 1 without gates and in the
    inter tower) and ``c_jk = beta_{k+1} ... beta_j``:
    ``K_j = [c_jk (W_down_j W_up_k)^T]_{k<j}``, ``s_j = b_down_j + sum_{k<j} c_jk W_down_j b_up_k``,
    ``O = [c_nk (E W_up_k)^T]_k``, ``s_out = sum_k c_nk E b_up_k`` (``c_nk = beta_{k+1} ... beta_{n-1}``).
    The products are :class:`AdapterTerms` (one autograd node); the coefficients, ``n (n + 1) / 2``
    numbers, are built here with autograd. ``down_t``: every ``W_down_j^T`` for the forward's matmuls
    (:func:`transposed`, no gradient: the backward uses ``W_down_j`` itself)."""
    n, r = len(blocks), blocks[0].down.weight.size(0)
    coefs = _coefficients(n, (1.0 - g) if (kind == "intra" and g is not None) else None, out_w)
    flat = [t for b in blocks for t in (b.down.weight, b.down.bias, b.up.weight, b.up.bias)]
    *ks, o, s_out = AdapterTerms.apply(r, coefs, out_w, *flat)
    with torch.no_grad():
        down_t = transposed([b.down.weight for b in blocks])
    return {"K": [out_w.new_empty(0, r)] + ks[n:], "s": ks[:n], "O": o, "s_out": s_out, "down_t": down_t}


def _coefficients(n: int, beta: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``C [n + 1, n]``: ``C[j, k] = c_jk`` for ``k < j`` (:func:`adapter_terms`), 0 elsewhere: the product of
    ``beta_m`` over ``k < m <= min(j, n - 1)``, for every ``(j, k)`` at once (one ``prod`` over ``m``)."""
    lower = torch.ones(n + 1, n, dtype=like.dtype, device=like.device).tril(-1)
    if beta is None:
        return lower
    idx = torch.arange(n + 1, device=like.device)
    j, k, m = idx[:, None, None], idx[None, :n, None], idx[None, None, :n]
    inside = (m > k) & (m <= j.clamp_max(n - 1))  # [n + 1, n, n]
    return torch.where(inside, beta, beta.new_ones(())).prod(-1) * lower


class AdapterTerms(torch.autograd.Function):
    """:func:`adapter_terms`' products as one node with a hand-written backward: from
    ``C [n + 1, n]`` (:func:`_coefficients`), ``E [d, D]`` and per step ``(W_down, b_down, W_up, b_up)``,
    the outputs ``s_0 .. s_{n-1}, K_1 .. K_{n-1}, O, s_out``. With ``U = [W_up_0^T; ..; W_up_{n-1}^T]``
    (``[n r, D]``) every product is a block of ``U [W_down_j^T | E^T]``: ``K_j`` is ``U[:j r] W_down_j^T``
    with its ``r``-row blocks scaled by ``C[j]``, ``O`` is ``U E^T`` scaled by ``C[n]``; the biases take
    ``V = C [b_up_0; ..; b_up_{n-1}]`` (``[n + 1, D]``). Each weight's gradient is then one matmul
    (``W_up_k``'s from the blocks of every later step at once), written once, not accumulated."""

    @staticmethod
    def forward(ctx, r, coefs, out_w, *flat):
        n = len(flat) // 4
        downs, b_downs = flat[0::4], flat[1::4]
        ups = torch.cat(flat[2::4], dim=1)  # [D, n r]
        ups_t = ups.t()
        b_ups = torch.stack(flat[3::4])  # [n, D]
        v = coefs @ b_ups  # [n + 1, D]
        # each product as the transpose of W @ U (a [r, j r] result): MKL runs it faster than U^T W^T (both
        # operands transposed) on one thread
        raws = [(downs[j] @ ups[:, : j * r]).t() for j in range(1, n)] + [(out_w @ ups).t()]
        scaled = [m * _blockwise(coefs[j, :j], r) for j, m in enumerate(raws, start=1)]
        s = [b_downs[0].clone()] + [torch.addmv(b_downs[j], downs[j], v[j]) for j in range(1, n)]
        ctx.r, ctx.n = r, n
        ctx.save_for_backward(coefs, out_w, ups_t, b_ups, v, *downs, *raws)
        return (*s, *scaled, out_w @ v[n])

    @staticmethod
    def backward(ctx, *grads):
        r, n = ctx.r, ctx.n
        coefs, out_w, ups_t, b_ups, v, *rest = ctx.saved_tensors
        downs, raws = rest[:n], rest[n:]
        d_s, d_scaled, d_sout = grads[:n], grads[n:2 * n], grads[2 * n]
        d_coefs, d_v = torch.zeros_like(coefs), torch.zeros_like(v)
        d_raws = []  # dL/d(unscaled product), j = 1 .. n (n: O's)
        for j, (dm, raw) in enumerate(zip(d_scaled, raws), start=1):
            if dm is None:
                d_raws.append(torch.zeros_like(raw))
                continue
            if ctx.needs_input_grad[1]:  # the gates' share (no gates: C is a constant)
                d_coefs[j, :j] = (dm * raw).sum(1).view(j, r).sum(1)
            d_raws.append(dm * _blockwise(coefs[j, :j], r))
        d_bdowns = [d if d is not None else w.new_zeros(r) for d, w in zip(d_s, downs)]
        d_downs = [None]
        for j in range(1, n):
            dw = d_raws[j - 1].t() @ ups_t[: j * r]
            if d_s[j] is not None:
                dw.addr_(d_s[j], v[j])
                torch.mv(downs[j].t(), d_s[j], out=d_v[j])
            d_downs.append(dw)
        d_out = d_raws[-1].t() @ ups_t
        if d_sout is not None:
            d_out.addr_(d_sout, v[n])
            torch.mv(out_w.t(), d_sout, out=d_v[n])
        if ctx.needs_input_grad[1]:
            d_coefs.addmm_(d_v, b_ups.t())
        d_bups = coefs.t() @ d_v  # [n, D]
        # W_up_k meets W_down_j (j > k) in K_j and E in O: its gradient is one matmul over those blocks
        later = torch.cat([*downs[1:], out_w])  # W_down_1 .. W_down_{n-1}, E: [(n - 1) r + d, D]
        d_ups = []
        for k in range(n):
            left = torch.cat([d_raws[j - 1][k * r:(k + 1) * r] for j in range(k + 1, n + 1)], dim=1)
            d_ups.append(later[k * r:].t() @ left.t())  # [D, r]
        grads_flat = [t for j in range(n) for t in (d_downs[j], d_bdowns[j], d_ups[j], d_bups[j])]
        return (None, d_coefs if ctx.needs_input_grad[1] else None, d_out, *grads_flat)


def _blockwise(c: torch.Tensor, r: int) -> torch.Tensor:
    """``[k r, 1]``: each of the ``k`` coefficients repeated over its block of ``r`` rows."""
    return c.repeat_interleave(r)[:, None]


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
    never formed. The forward goes through the items in passes of ``chunk`` rows (a training step:
    :data:`TRAIN_CHUNK`, one pass); the backward's ``r``-wide part runs over all of them at once, its
    ``D``-wide part in passes of :data:`GATE_CHUNK`."""

    @staticmethod
    def forward(ctx, kind, chunk, buffers, downs_t, xa, xb, g, out_w, o_mat, *flat):
        n = len(flat) // 3
        tw = Tower(kind, g, n)
        downs, ss, ks = flat[0::3], flat[1::3], flat[2::3]
        m, r = xa.size(1), downs[0].size(0)
        shape = (n, m, xa.size(2))  # every step's H for the backward: the largest tensor of a step
        h_all = buffers.take(shape, out_w.dtype, xa.device) if buffers is not None else out_w.new_empty(shape)
        acts = out_w.new_empty(m, n * r)
        for s in range(0, m, chunk):
            _chunk_forward(tw, xa[:, s:s + chunk], xb[:, s:s + chunk] if xb is not None else None,
                           downs_t, ss, ks, r, out_w.dtype, out=h_all[:, s:s + chunk], acts=acts[s:s + chunk])
        ye = torch.mm(h_all[-1], out_w.t())  # H_{n-1} E^T: the gates' backward needs it (_gate_grads)
        y = torch.addmm(ye, acts, o_mat)
        ctx.tower, ctx.n = tw, n
        ctx.save_for_backward(xa, xb, out_w, o_mat, h_all, acts, ye if g is not None else None, *flat)
        return y

    @staticmethod
    def backward(ctx, dy):
        """The ``r``-wide part for all items at once (``dL/dpre_j`` step by step, last first, and from it
        every weight gradient: one matmul each over all items), then, with gates, the ``D``-wide
        ``dL/dH_j`` chunk by chunk, which only they need (:func:`_gate_grads`)."""
        tw, n = ctx.tower, ctx.n
        xa, xb, out_w, o_mat, h_all, acts, ye, *flat = ctx.saved_tensors
        downs, ss, ks = flat[0::3], flat[1::3], flat[2::3]
        r = downs[0].size(0)
        d_o = (dy.t() @ acts).t()  # the K = M reductions as transposed [r, j r] products (as in AdapterTerms)
        d_acts = dy @ o_mat.t()  # dL/d[a_0 .. a_{n-1}], completed step by step (last first)
        gps, d_ss, d_ks = [None] * n, [None] * n, [torch.empty_like(ks[0])] + [None] * (n - 1)
        for j in reversed(range(n)):
            cols = slice(j * r, (j + 1) * r)
            gp = gps[j] = torch.ops.aten.threshold_backward(d_acts[:, cols], acts[:, cols], 0.0)  # dL/dpre_j
            d_ss[j] = gp.sum(0)
            if j:
                d_ks[j] = (gp.t() @ acts[:, : j * r]).t()
                d_acts[:, : j * r].addmm_(gp, ks[j].t())
        # dL/dE and dL/dW_down_{n-1} in one product over H_{n-1} (one read of it)
        last_in = torch.cat([dy, gps[-1]], dim=1)  # [M, d + r]
        both = last_in.t() @ h_all[-1]
        d_out, d_downs = both[: dy.size(1)], [gp.t() @ h_all[j] for j, gp in enumerate(gps[:-1])] + [both[dy.size(1):]]
        dg = None
        if tw.g is not None:
            # <dL/dpre_j, a_j> for every j at once: d_acts' block j is final once step j ran, and where the
            # ReLU is off a_j is 0, so <dL/da_j, a_j> is the same sum (one pass, no copy of acts' columns)
            pre_a = (d_acts * acts).view(acts.size(0), n, r).sum((0, 2))
            own = [pre_a[j] - d_ss[j].dot(ss[j]) - (d_ks[j] * ks[j]).sum()
                   for j in range(n)]  # <dL/dpre_j, H_j W_down_j^T>
            last = dy.reshape(-1).dot(ye.view(-1))  # <dy, H_{n-1} E^T>
            dg = _gate_grads(tw, GATE_CHUNK, last_in, out_w, xa, xb, h_all, gps, downs, own, last)
        grads = [t for j in range(n) for t in (d_downs[j], d_ss[j], d_ks[j])]
        return (None, None, None, None, None, None, dg, d_out, d_o, *grads)


def _chunk_forward(tw: "Tower", xa, xb, downs_t, ss, ks, r: int, dtype, keep: bool = True, out=None, acts=None):
    """One chunk's ``H`` and activations ``[c, n r]`` (:class:`TowerFunction`; into ``acts`` if given):
    with ``keep`` every ``H_j`` (``[n, c, D]``, for the backward; into ``out`` if given), else the last
    one (``[c, D]``, one buffer in place)."""
    n, c, dim = xa.shape
    xs, xbs = Rows(xa, dtype), Rows(xb, dtype) if xb is not None else None
    new = dict(dtype=dtype, device=xa.device)
    h_l = out if out is not None else torch.empty(n if keep else 1, c, dim, **new)
    mix = h_l[0] if keep or tw.kind != "inter" else torch.empty(c, dim, **new)
    acts = acts if acts is not None else torch.empty(c, n * r, **new)
    steps = h_l.unbind(0)  # one view per step: step_input tells "in place" by identity
    for j in range(n):
        h, prev = (steps[j], steps[j - 1] if j else None) if keep else (steps[0], steps[0] if j else None)
        _adapter_step(tw, xs, xbs, j, prev, h, h if keep else mix, downs_t[j], ss[j], ks[j], acts, r)
    return (h_l if keep else h_l[0]), acts


def transposed(weights) -> list:
    """``W^T`` of each ``[r, D]`` weight as a contiguous ``[D, r]`` copy (made once per
    :func:`adapter_terms`): the forward's ``H_j W_down_j^T`` multiplies by it without a transposed operand."""
    return [w.t().contiguous() for w in weights]


def _adapter_step(tw: "Tower", xs, xbs, j: int, prev, h, mix, down_t, s, k, acts, r: int) -> None:
    """Step ``j``: ``H_j`` into ``h`` (from ``prev``, ``H_{j-1}``, which may be ``h``: in place) and
    ``a_j = relu(H_j W_down_j^T + [a_0 .. a_{j-1}] K_j + s_j)`` into its columns of ``acts``;
    ``down_t``: ``W_down_j^T`` (:func:`transposed`)."""
    tw.step_input(xs, xbs, j, prev, out=h, mix=mix)
    pre = torch.addmm(s, h, down_t)
    if j:
        pre.addmm_(acts[:, : j * r], k)
    torch.clamp_min(pre, 0.0, out=acts[:, j * r:(j + 1) * r])


def _gate_grads(tw: "Tower", chunk: int, last_in, out_w, xa, xb, h_all, gps, downs, own: list, last) -> torch.Tensor:
    """``dL/dg`` (``[n]``). With ``dH_j = dL/dH_j`` (``dH_{n-1} = dy E + dL/dpre_{n-1} W_down_{n-1}``,
    ``dH_j = beta_{j+1} dH_{j+1} + dL/dpre_j W_down_j``), ``D``-wide, chunk by chunk and in place, a gate
    needs ``dH_j`` against the difference it weighs: intra ``<dH_j, h_j - H_{j-1}>``, inter
    ``<dH_j, xb_j - xa_j>``. Of the inner products that takes, ``P_j = <dH_j, H_j>`` comes from ``r``-wide
    ones: ``own[j] = <dL/dpre_j, H_j W_down_j^T>`` and ``last = <dy, H_{n-1} E^T>`` give
    ``P_{n-1} = last + own[n-1]``, ``P_j = beta_{j+1} Q_{j+1} + own[j]``, so a step reads ``D``-wide
    ``Q_j = <dH_j, H_{j-1}>`` and, where dividing by a gate could lose precision, one input:
    intra (``H_j - H_{j-1} = g_j (h_j - H_{j-1})``) ``(P_j - Q_j) / g_j`` if ``g_j >= 1/4``, else
    ``<dH_j, h_j> - Q_j``; inter (``H_j - H_{j-1} = xa_j + g_j (xb_j - xa_j)``) ``(P_j - Q_j - <dH_j, xa_j>) / g_j``
    if ``g_j >= 1/2``, else ``(<dH_j, xb_j> - P_j + Q_j) / (1 - g_j)``."""
    n, g, intra = h_all.size(0), tw.values, tw.kind == "intra"
    beta = tw.keep if intra else [1.0] * n
    reads = [("a" if g[j] < 0.25 else None) if intra else ("a" if g[j] >= 0.5 else "b") for j in range(n)]
    q_dots, x_dots = [[] for _ in range(n)], [[] for _ in range(n)]
    # dH_{n-1} = [dy, dL/dpre_{n-1}] [E; W_down_{n-1}] (``last_in``: [dy, dL/dpre_{n-1}]): one product per chunk
    last_w = torch.cat([out_w, downs[n - 1]])
    for s in range(0, h_all.size(1), chunk):
        rows = slice(s, s + chunk)
        dh = last_in[rows] @ last_w
        flat = dh.view(-1)
        inputs = {k: Rows((xa if k == "a" else xb)[:, rows], dh.dtype) for k in set(reads) if k is not None}
        for j in reversed(range(0 if reads[0] is not None else 1, n)):  # dH_0 only ever meets an input
            if j < n - 1:
                dh.addmm_(gps[j][rows], downs[j], beta=beta[j + 1])
            if j:
                q_dots[j].append(flat.dot(h_all[j - 1, rows].reshape(-1)))
            if reads[j] is not None:
                x_dots[j].append(flat.dot(inputs[reads[j]][j].view(-1)))
    zero = last_in.new_zeros(())
    q = [torch.stack(d).sum() if d else zero for d in q_dots]
    x = [torch.stack(d).sum() if d else zero for d in x_dots]
    dg, p = [None] * n, None
    for j in reversed(range(n)):
        p = own[j] + (last if j == n - 1 else beta[j + 1] * q[j + 1])  # P_j
        if intra:
            dg[j] = x[j] - q[j] if reads[j] else (p - q[j]) / g[j]
        else:
            dg[j] = (p - q[j] - x[j]) / g[j] if reads[j] == "a" else (x[j] - p + q[j]) / (1.0 - g[j])
    return torch.stack(dg)


# items per pass (results/speed/step_speed.md measures the alternatives):
CHUNK = 256  # without gradients (the item table): a step's buffers stay in the core's cache
TRAIN_CHUNK = 1 << 30  # a training step's forward: all its items in one pass (fewer, larger matmuls)
GATE_CHUNK = 128  # the gates' D-wide backward: dL/dH_j ([c, D]) stays in the core's L2
LOCKSTEP = True  # the evaluation's towers step by step together (benchmarks/step_speed.py measures both)


def run_tower(kind: str, xa: torch.Tensor, xb: Optional[torch.Tensor], g: Optional[torch.Tensor],
              blocks, out_w: torch.Tensor, chunk: Optional[int] = None, terms: Optional[dict] = None,
              buffers=None) -> torch.Tensor:
    """``[M, d]``: the tower over rows-first states (``[n, M, D]`` contiguous) projected by ``out_w [d, D]``;
    ``terms``: its :func:`adapter_terms` if already computed (without gradients); ``buffers``: a
    :class:`~recbole_iisan.utils.buffers.ReusedBuffers` for what the backward keeps."""
    t = terms if terms is not None else adapter_terms(kind, g, blocks, out_w)
    flat = [x for j, b in enumerate(blocks) for x in (b.down.weight, t["s"][j], t["K"][j])]
    if torch.is_grad_enabled() and any(x.requires_grad for x in [out_w, t["O"], *flat]):
        return TowerFunction.apply(kind, chunk or TRAIN_CHUNK, buffers, t["down_t"], xa, xb, g, out_w, t["O"],
                                   *flat) + t["s_out"]
    chunk = chunk or CHUNK
    with torch.no_grad():
        tw, r = Tower(kind, g, len(blocks)), blocks[0].down.weight.size(0)
        y = t["s_out"].expand(xa.size(1), -1).clone()
        for s in range(0, xa.size(1), chunk):
            sl = slice(s, s + chunk)
            h, acts = _chunk_forward(tw, xa[:, sl], xb[:, sl] if xb is not None else None, t["down_t"], flat[1::3],
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
        towers.append((Tower(kind, g, n), src, e, t["down_t"], t, blocks[0].down.weight.size(0)))
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
