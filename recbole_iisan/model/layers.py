"""Side-network building blocks of IISAN / IISAN-Versa: IISAN (Fu et al., SIGIR 2024,
arXiv:2404.02059) Sec. 3 and IISAN-Versa (Fu et al., IEEE TKDE, arXiv:2411.02992) Sec. III, as the
authors' public code (github.com/GAIR-Lab/IISAN, ``Code_Cached``) implements them.

All modules here work on *cached* backbone hidden states: a tower's input is a tensor
``[M, n_rows, D]`` (M items, the hidden-state rows chosen by LayerDrop, width D).

- :class:`SANB`: the side adapted network block, ``y = x + up(act(down(x)))`` (3.1).
- :class:`Gates`: learnable scalar gates ``sigmoid(theta / 0.1)``, theta initialised to 0 (3.3).
- :class:`IntraTower`: the recurrent gated side network of one modality (3.3).
- :class:`InterTower`: the inter-modal side network over the raw rows of both modalities,
  with per-step dimension transformation layers (DTL) when the widths differ and top-aligned
  pairing when the row counts differ (3.4).
- :class:`TwoLayerHead`: two Linears with no nonlinearity in between (3.5).
- :func:`make_heads`: the heads of the symmetric (VS) or asymmetric (VA) model (3.5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from recbole_iisan.model import fused
from recbole_iisan.model.fused import (SIDE_KERNELS, adapter_terms, fold_head, rows_first, run_tower,
                                       towers_in_lockstep)
from recbole_iisan.utils.buffers import ReusedBuffers
from recbole_iisan.utils.resources import trainable_parameters

GATE_TEMPERATURE = 0.1
SANB_INIT_STD = 0.01
ACTIVATIONS = ("relu", "gelu")
FUSIONS = ("gated", "add")


def _activation(name: str) -> nn.Module:
    name = str(name).lower()
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"sanb_activation: expected one of {ACTIVATIONS}, got {name!r}")


class SANB(nn.Module):
    """Side adapted network block: ``x + W_up act(W_down x + b_down) + b_up``.

    Weights ~ N(0, 0.01^2), biases zero, so the block starts as a near-identity. No dropout and
    no LayerNorm (the authors build a dropout layer but never apply it).
    """

    def __init__(self, dim: int, bottleneck: int, activation: str = "relu"):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = _activation(activation)
        self.up = nn.Linear(bottleneck, dim)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, mean=0.0, std=SANB_INIT_STD)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class Gates(nn.Module):
    """``n`` independent scalar gates ``sigmoid(theta_j / temperature)``; theta starts at 0 (gate 0.5)."""

    def __init__(self, n: int, temperature: float = GATE_TEMPERATURE):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n))
        self.temperature = float(temperature)

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.theta / self.temperature)

    def values(self) -> list[float]:
        with torch.no_grad():
            return [float(v) for v in self.forward().float().cpu()]


class IntraTower(nn.Module):
    """Intra-modal side network over the ``n`` selected rows of one modality.

    ``z = 0``; for j in 0..n-1: ``u = g_j * h_j + (1 - g_j) * z`` (``fusion='gated'``) or
    ``u = h_j + z`` (``fusion='add'``, no gates); ``z = SANB_j(u)``. Returns the final z.
    """

    def __init__(self, dim: int, n_steps: int, bottleneck: int, activation: str = "relu",
                 fusion: str = "gated"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion: expected one of {FUSIONS}, got {fusion!r}")
        if n_steps < 1:
            raise ValueError("an intra tower needs at least one hidden-state row")
        self.dim = dim
        self.n_steps = n_steps
        self.fusion = fusion
        self.blocks = nn.ModuleList(SANB(dim, bottleneck, activation) for _ in range(n_steps))
        self.gates = Gates(n_steps) if fusion == "gated" else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h``: ``[M, n_steps, dim]`` -> ``[M, dim]``."""
        if h.size(1) != self.n_steps or h.size(-1) != self.dim:
            raise ValueError(f"intra tower expects [M, {self.n_steps}, {self.dim}], got {list(h.shape)}")
        g = self.gates() if self.gates is not None else None
        z = torch.zeros_like(h[:, 0])
        for j, block in enumerate(self.blocks):
            x = h[:, j]
            u = g[j] * x + (1.0 - g[j]) * z if g is not None else x + z
            z = block(u)
        return z

    def gate_values(self) -> list[float]:
        return self.gates.values() if self.gates is not None else []


class InterTower(nn.Module):
    """Inter-modal side network over the raw rows of towers A ("text") and B ("image").

    Runs ``n = min(n_a, n_b)`` steps over the **top** n rows of each tower (top-aligned pairing).
    The tower lives in width ``D_m = min(D_a, D_b)``; when the widths differ the wider tower's row
    goes through a per-step ``Linear(D_wide -> D_m)`` (DTL, default init) first.
    ``m = 0``; ``m = SANB_j(m + b_j * X^B_j + (1 - b_j) * X^A_j)`` with ``b_j = sigmoid(phi_j/0.1)``
    (``fusion='add'``: ``m + X^B_j + X^A_j``, no gates). The residual m is ungated.
    """

    def __init__(self, dim_a: int, n_a: int, dim_b: int, n_b: int, bottleneck: int,
                 activation: str = "relu", fusion: str = "gated"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion: expected one of {FUSIONS}, got {fusion!r}")
        self.n_a, self.n_b = n_a, n_b
        self.dim_a, self.dim_b = dim_a, dim_b
        self.n_steps = min(n_a, n_b)
        self.dim = min(dim_a, dim_b)
        self.fusion = fusion
        self.blocks = nn.ModuleList(SANB(self.dim, bottleneck, activation) for _ in range(self.n_steps))
        self.gates = Gates(self.n_steps) if fusion == "gated" else None
        # which side needs a DTL (None when the widths are equal)
        self.dtl_side: Optional[str] = None
        if dim_a != dim_b:
            self.dtl_side = "a" if dim_a > dim_b else "b"
            wide = max(dim_a, dim_b)
            self.dtls = nn.ModuleList(nn.Linear(wide, self.dim) for _ in range(self.n_steps))
        else:
            self.dtls = None

    def forward(self, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
        """``h_a``: ``[M, n_a, D_a]``, ``h_b``: ``[M, n_b, D_b]`` -> ``[M, D_m]``."""
        if h_a.size(1) != self.n_a or h_b.size(1) != self.n_b:
            raise ValueError(
                f"inter tower expects {self.n_a} and {self.n_b} rows, got {h_a.size(1)} and {h_b.size(1)}"
            )
        off_a, off_b = self.n_a - self.n_steps, self.n_b - self.n_steps
        g = self.gates() if self.gates is not None else None
        m = h_a.new_zeros(h_a.size(0), self.dim)
        for j, block in enumerate(self.blocks):
            xa, xb = h_a[:, off_a + j], h_b[:, off_b + j]
            if self.dtl_side == "a":
                xa = self.dtls[j](xa)
            elif self.dtl_side == "b":
                xb = self.dtls[j](xb)
            if g is not None:
                mix = g[j] * xb + (1.0 - g[j]) * xa
            else:
                mix = xb + xa
            m = block(m + mix)
        return m

    def gate_values(self) -> list[float]:
        return self.gates.values() if self.gates is not None else []


class TwoLayerHead(nn.Module):
    """``second(first(x))``: two Linears with no nonlinearity between them (3.5)."""

    def __init__(self, dim_in: int, dim_mid: int, dim_out: int, xavier_second: bool = False):
        super().__init__()
        self.first = nn.Linear(dim_in, dim_mid)
        self.second = nn.Linear(dim_mid, dim_out)
        if xavier_second:
            # the authors' image head: the former ViT classifier, Xavier-normal with zero bias
            nn.init.xavier_normal_(self.second.weight)
            nn.init.zeros_(self.second.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


HEAD_TYPES = ("symmetric", "asymmetric")


def make_tower_head(head_type: str, dim: int, d: int, image_side: bool) -> TwoLayerHead:
    """Head of one intra tower.

    - ``symmetric`` (IISAN, VS): ``Linear(D, D)`` then ``Linear(D, d)``; on the image side the
      second Linear is Xavier-normal with zero bias (the authors' ViT classifier).
    - ``asymmetric`` (IISAN-Versa, VA): ``Linear(D, d)`` then a new default-init ``Linear(d, d)``.
    """
    if head_type == "symmetric":
        return TwoLayerHead(dim, dim, d, xavier_second=image_side)
    if head_type == "asymmetric":
        return TwoLayerHead(dim, d, d)
    raise ValueError(f"head_type: expected one of {HEAD_TYPES}, got {head_type!r}")


def make_inter_head(dim: int, d: int) -> TwoLayerHead:
    """Head of the inter tower: ``Linear(D_m, D_m)`` then ``Linear(D_m, d)`` (both model kinds)."""
    return TwoLayerHead(dim, dim, d)


MODALITIES = ("intra_inter", "intra", "inter")


@dataclass(frozen=True)
class SideNetworkConfig:
    """What a :class:`SideNetwork` is made of: the shapes of towers A's and B's states (``n_a``
    rows of width ``dim_a``; ``n_b`` x ``dim_b``) and the IISAN keys of ``properties/IISAN.yaml``
    (``embedding_size`` = d, ``sanb_size`` = r, ``inter_sanb_size`` (None: r),
    ``sanb_activation``, ``head_type``, ``modality``, ``fusion``, ``frozen_backbone``, ``side_kernel``)."""

    dim_a: int
    n_a: int
    dim_b: int
    n_b: int
    embedding_size: int
    sanb_size: int
    inter_sanb_size: Optional[int]
    sanb_activation: str
    head_type: str
    modality: str
    fusion: str
    frozen_backbone: bool
    side_kernel: str = "fused"

    def __post_init__(self) -> None:
        for key, allowed in (("sanb_activation", ACTIVATIONS), ("head_type", HEAD_TYPES), ("modality", MODALITIES),
                             ("fusion", FUSIONS), ("side_kernel", SIDE_KERNELS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: expected one of {allowed}, got {getattr(self, key)!r}")

    @classmethod
    def from_config(cls, config: Any, shape_a: tuple[int, int], shape_b: tuple[int, int]) -> "SideNetworkConfig":
        """From a RecBole config and the towers' ``(rows, width)``."""
        inter = config["inter_sanb_size"]
        return cls(dim_a=shape_a[1], n_a=shape_a[0], dim_b=shape_b[1], n_b=shape_b[0],
                   embedding_size=int(config["embedding_size"]), sanb_size=int(config["sanb_size"]),
                   inter_sanb_size=None if inter is None else int(inter),
                   sanb_activation=str(config["sanb_activation"]).lower(), head_type=str(config["head_type"]),
                   modality=str(config["modality"]), fusion=str(config["fusion"]),
                   frozen_backbone=bool(config["frozen_backbone"]), side_kernel=str(config["side_kernel"]))


class SideNetwork(nn.Module):
    """The whole IISAN item side on given backbone states: towers, heads and fusion.

    ``forward(h_a [M, n_a, D_a], h_b [M, n_b, D_b]) -> [M, d]`` with
    ``e = fusion([head_B(intra_B(h_B)), head_A(intra_A(h_A)), head_inter(inter(h_A, h_B))])``
    (SIGIR'24 Sec. 3, TKDE Sec. 3). The states come from a *state source*: rows gathered from the
    cache (IISANVS / IISANVA) or computed live by the frozen backbones (IISANUncached); the module is
    the same, so cached and live IISAN give the same item embeddings for the same states.

    ``frozen_backbone`` (the Table VI ablation): a head on each tower's last row, no SANBs.
    Modules are created in the order intra A, intra B, head A, head B, inter, inter head, fusion.
    """

    def __init__(self, cfg: SideNetworkConfig):
        super().__init__()
        self.config = cfg
        dim_a, n_a, dim_b, n_b, d = cfg.dim_a, cfg.n_a, cfg.dim_b, cfg.n_b, cfg.embedding_size
        sanb_size, activation, head_type = cfg.sanb_size, cfg.sanb_activation, cfg.head_type
        modality, fusion = cfg.modality, cfg.fusion
        self.modality = modality
        self.frozen_backbone = bool(cfg.frozen_backbone)
        self.intra_a = self.intra_b = self.inter = None
        self.head_a = self.head_b = self.head_inter = None
        if self.frozen_backbone:
            self.head_a = make_tower_head(head_type, dim_a, d, image_side=False)
            self.head_b = make_tower_head(head_type, dim_b, d, image_side=True)
            n_parts = 2
        else:
            n_parts = 0
            if modality in ("intra_inter", "intra"):
                self.intra_a = IntraTower(dim_a, n_a, sanb_size, activation, fusion)
                self.intra_b = IntraTower(dim_b, n_b, sanb_size, activation, fusion)
                self.head_a = make_tower_head(head_type, dim_a, d, image_side=False)
                self.head_b = make_tower_head(head_type, dim_b, d, image_side=True)
                n_parts += 2
            if modality in ("intra_inter", "inter"):
                r_inter = cfg.inter_sanb_size if cfg.inter_sanb_size is not None else sanb_size
                self.inter = InterTower(dim_a, n_a, dim_b, n_b, r_inter, activation, fusion)
                self.head_inter = make_inter_head(self.inter.dim, d)
                n_parts += 1
        self.fusion = nn.Linear(n_parts * d, d)
        self._folded, self._folded_key = None, None
        self._tower_buffers = ReusedBuffers(keep=4)  # what the fused towers' backward keeps (one per tower)

    @property
    def fused(self) -> bool:
        """Whether ``side_kernel: fused`` applies: SANB towers with ReLU (else the modules run; an inter
        tower with DTLs runs as modules inside the fused path)."""
        return self.config.side_kernel == "fused" and not self.frozen_backbone and self.config.sanb_activation == "relu"

    def forward(self, h_a: torch.Tensor, h_b: torch.Tensor, rows_first_states: bool = False) -> torch.Tensor:
        """``h_a [M, n_a, D_a]``, ``h_b [M, n_b, D_b]`` -> ``[M, d]``; with ``rows_first_states`` the
        states come as ``[n, M, D]`` (views of the cache, any float dtype: :func:`.fused.rows_first`)."""
        autocast = torch.is_autocast_enabled(h_a.device.type)
        if self.fused and not autocast:
            if not rows_first_states:
                h_a, h_b = rows_first(h_a), rows_first(h_b)
            return self._forward_fused(h_a, h_b)
        if rows_first_states:
            h_a, h_b = h_a.transpose(0, 1).float(), h_b.transpose(0, 1).float()
        return self._forward_modules(h_a, h_b)

    def _tower_parts(self, xa: torch.Tensor, xb: torch.Tensor) -> list[tuple]:
        """``(kind, rows, rows of B or None, tower, head)`` in the fusion's order (B, A, inter)."""
        parts = []
        if self.intra_a is not None:
            parts += [("intra", xb, None, self.intra_b, self.head_b), ("intra", xa, None, self.intra_a, self.head_a)]
        if self.inter is not None:
            n = self.inter.n_steps
            top = [x[x.size(0) - n:] if x is not None else None for x in (xa, xb)]
            parts.append(("inter", *top, self.inter, self.head_inter))
        return parts

    def _fold(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each tower's head and fusion block as one ``[d, D]`` matrix, and the summed bias."""
        blocks = self.fusion.weight.split(self.config.embedding_size, dim=1)
        heads = [h for h in (self.head_b, self.head_a) if self.intra_a is not None] + \
            ([self.head_inter] if self.inter is not None else [])
        folded = [fold_head(h, f) for h, f in zip(heads, blocks)]
        return [e for e, _ in folded], self.fusion.bias + sum(c for _, c in folded)

    def train(self, mode: bool = True):
        if mode:  # as the item table: entering training drops the folded heads
            self._folded, self._folded_key = None, None
        return super().train(mode)

    def folded(self) -> tuple[list[torch.Tensor], torch.Tensor, list]:
        """:meth:`_fold` and, without gradients, each tower's :func:`.fused.adapter_terms`, kept while
        the parameters do not change (the item table's chunks share them)."""
        if torch.is_grad_enabled():
            return (*self._fold(), None)
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._folded_key != key:
            outs, bias = self._fold()
            terms = [adapter_terms(kind, tower.gates() if tower.gates is not None else None, tower.blocks, e)
                     if not (kind == "inter" and tower.dtls is not None) else None
                     for (kind, _, _, tower, _), e in zip(self._tower_parts(None, None), outs)]
            self._folded, self._folded_key = (outs, bias, terms), key
        return self._folded

    def _forward_fused(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        outs, bias, terms = self.folded()
        terms = terms or [None] * len(outs)
        parts = self._tower_parts(xa, xb)
        if fused.LOCKSTEP and not torch.is_grad_enabled() and xa.size(0) == xb.size(0) and (self.inter is None or self.inter.dtls is None):
            specs = [(kind, "ab" if x2 is not None else ("a" if x1 is xa else "b"),
                      tower.gates() if tower.gates is not None else None, tower.blocks, e, t)
                     for (kind, x1, x2, tower, _), e, t in zip(parts, outs, terms)]
            return towers_in_lockstep(specs, xa, xb, bias)
        y = None
        for (kind, x1, x2, tower, _), e, t in zip(parts, outs, terms):
            if kind == "inter" and tower.dtls is not None:  # widths differ: the DTLs' inputs need gradients
                part = tower(xa.transpose(0, 1).to(e.dtype), xb.transpose(0, 1).to(e.dtype)) @ e.t()
            else:
                g = tower.gates() if tower.gates is not None else None
                part = run_tower(kind, x1, x2, g, tower.blocks, e, terms=t, buffers=self._tower_buffers)
            y = part if y is None else y + part
        return y + bias

    def _forward_modules(self, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
        if self.frozen_backbone:
            parts = [self.head_b(h_b[:, -1]), self.head_a(h_a[:, -1])]
        else:
            parts = []
            if self.intra_a is not None:
                parts.append(self.head_b(self.intra_b(h_b)))
                parts.append(self.head_a(self.intra_a(h_a)))
            if self.inter is not None:
                parts.append(self.head_inter(self.inter(h_a, h_b)))
        return self.fusion(torch.cat(parts, dim=-1))

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """The authors' optimiser groups other than ``recsys`` (tower A plays "text", B "image"):
        ``text_sanb``: A's SANBs; ``image_sanb``: B's and the inter tower's SANBs; ``image_head``:
        B's first head Linear and B's gates; ``text_head``: A's first head Linear. Everything else
        (second head Linears, inter head, A's and the inter gates, DTLs, fusion) is ``recsys``."""

        def params(*modules) -> list[nn.Parameter]:
            return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]

        return {
            "text_sanb": params(self.intra_a.blocks if self.intra_a is not None else None),
            "image_sanb": params(self.intra_b.blocks if self.intra_b is not None else None,
                                 self.inter.blocks if self.inter is not None else None),
            "image_head": params(self.head_b.first if self.head_b is not None else None,
                                 self.intra_b.gates if self.intra_b is not None else None),
            "text_head": params(self.head_a.first if self.head_a is not None else None),
        }

    def part_counts(self, name_a: str, name_b: str) -> dict[str, int]:
        n = trainable_parameters
        return {f"{name_a} tower": n(self.intra_a), f"{name_b} tower": n(self.intra_b), "inter tower": n(self.inter),
                "heads": n(self.head_a, self.head_b, self.head_inter), "fusion": n(self.fusion)}

    def gate_values(self, name_a: str, name_b: str) -> dict[str, list[float]]:
        """Intra gates per tower (weight on the backbone row) and inter gates (weight on B's row)."""
        return {
            name_a: self.intra_a.gate_values() if self.intra_a is not None else [],
            name_b: self.intra_b.gate_values() if self.intra_b is not None else [],
            "inter": self.inter.gate_values() if self.inter is not None else [],
        }
