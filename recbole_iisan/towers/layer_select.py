"""LayerDrop: which hidden states of each frozen encoder the side networks read.

Conventions (as the authors' code, github.com/GAIR-Lab/IISAN; IISAN-Versa, arXiv:2411.02992,
Sec. III and Eq. (5) for group LayerDrop):
- *block* indices are 0-based transformer blocks; *hidden-state* index = block index + 1;
  hidden state 0 is the embedding-layer output.
- With ``include_embedding_state`` (the authors' default, ``remove_first=None``) hidden state 0
  is prepended, so the paper's "6 even layers" of a 12-layer encoder run 7 SANBs.

Schemes for one tower (``n`` = number of blocks in the encoder, ``k`` = blocks to keep):
- ``even``: the outputs of even 1-based layers, blocks 1, 3, 5, ... (6 of 12; 3 of 6).
- ``all``: every block (LayerDrop off).
- ``even_all``: k blocks evenly spaced over the whole stack, ending at the last block
  (group LayerDrop; the stride is ``group_stride``, see ``group_stride``).
- ``top`` / ``down``: the last / first k blocks.
- ``even_top`` / ``even_down``: the odd 0-based blocks of the upper / lower half.
- an explicit list of block indices.

For two towers of different depth (IISAN-VA) the shallower tower uses ``layer_scheme`` and the
deeper one ``deep_layer_scheme`` with k = the shallower tower's block count, so the towers
line up step for step. For equal depths (IISAN-VS) both use ``layer_scheme``.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

Scheme = Union[str, Sequence[int]]

SCHEMES = ("even", "all", "even_all", "top", "down", "even_top", "even_down")


def group_stride(n_layers: int, k: int, rule: str = "script", n_other: int | None = None) -> int:
    """Stride of group LayerDrop over ``n_layers`` blocks when keeping ``k`` of them.

    - ``script`` (default; what produced the published numbers): ``floor((n-1)/(k-1))``,
      e.g. 24 -> 4, 32 -> 6, 28 -> 5, 80 -> 15 with k = 6.
    - ``eq5`` (the paper's Eq. 5): stride = k' + 1 with k' = max{k' : n - k'*n_other/2 >= 1},
      where ``n_other`` is the other (image) tower's depth: 24 -> 4, 32 -> 6, 28 -> 5, 80 -> 14.
    """
    if k <= 1:
        return max(n_layers, 1)
    if rule == "script":
        return max((n_layers - 1) // (k - 1), 1)
    if rule == "eq5":
        if n_other is None:
            n_other = 2 * k
        half = n_other / 2.0
        kp = int((n_layers - 1) // half)
        while kp > 0 and n_layers - kp * half < 1:
            kp -= 1
        return kp + 1
    raise ValueError(f"group_stride: expected 'script' or 'eq5', got {rule!r}")


def select_blocks(
    n_layers: int,
    scheme: Scheme,
    k: int | None = None,
    stride_rule: str = "script",
    n_other: int | None = None,
) -> list[int]:
    """0-based block indices that the scheme keeps for an encoder with ``n_layers`` blocks."""
    if n_layers < 1:
        raise ValueError(f"an encoder needs at least one layer, got {n_layers}")
    if not isinstance(scheme, str):
        blocks = sorted({int(b) for b in scheme})
        bad = [b for b in blocks if not 0 <= b < n_layers]
        if bad or not blocks:
            raise ValueError(
                f"layer list {list(scheme)}: block indices must be in 0..{n_layers - 1}"
            )
        return blocks
    if scheme == "even":
        return [b for b in range(n_layers) if b % 2 == 1] or [n_layers - 1]
    if scheme == "all":
        return list(range(n_layers))
    if k is None:
        k = max(n_layers // 2, 1)
    k = min(k, n_layers)
    if scheme == "even_all":
        s = group_stride(n_layers, k, stride_rule, n_other)
        return [(n_layers - 1) - s * m for m in range(k - 1, -1, -1)]
    if scheme == "top":
        return list(range(n_layers - k, n_layers))
    if scheme == "down":
        return list(range(k))
    if scheme in ("even_top", "even_down"):
        half = n_layers // 2
        rng = range(half, n_layers) if scheme == "even_top" else range(half)
        return [b for b in rng if b % 2 == 1]
    raise ValueError(f"layer_scheme: expected one of {SCHEMES} or a list of block indices, got {scheme!r}")


def hidden_state_indices(blocks: Sequence[int], include_embedding_state: bool = True) -> list[int]:
    """Hidden-state rows read for the given blocks (row 0 = embedding output, if included)."""
    rows = [b + 1 for b in blocks]
    return ([0] if include_embedding_state else []) + rows


def tower_layers(
    depths: Mapping[str, int],
    layer_scheme: Scheme = "even",
    deep_layer_scheme: Scheme = "even_all",
    stride_rule: str = "script",
    layerdrop: bool = True,
    include_embedding_state: bool = True,
    overrides: Mapping[str, Scheme] | None = None,
) -> dict[str, list[int]]:
    """Hidden-state indices each tower reads, given each tower's encoder depth.

    ``overrides`` maps a tower name to an explicit scheme (``<tower>_layers`` in the config).
    """
    overrides = dict(overrides or {})
    names = list(depths)
    if not layerdrop:
        blocks = {t: list(range(depths[t])) for t in names}
    else:
        shallow = min(depths.values())
        blocks = {}
        # the shallowest tower(s) first: their count sets k for the deeper ones
        base = {t: select_blocks(depths[t], overrides.get(t, layer_scheme)) for t in names if depths[t] == shallow}
        k = max(len(b) for b in base.values())
        for t in names:
            if t in base:
                blocks[t] = base[t]
            else:
                blocks[t] = select_blocks(
                    depths[t], overrides.get(t, deep_layer_scheme), k=k,
                    stride_rule=stride_rule, n_other=shallow,
                )
    return {t: hidden_state_indices(blocks[t], include_embedding_state) for t in names}


def tower_layers_from_config(config: Mapping, depths: Mapping[str, int]) -> dict[str, list[int]]:
    """``tower_layers`` with its arguments read from a RecBole config (or any mapping)."""

    def get(key: str, default):
        try:
            value = config[key]
        except KeyError:
            value = None
        return default if value is None else value

    if bool(get("frozen_backbone", False)):
        # the "frozen backbone" ablation reads the last hidden state only
        return {t: [int(depths[t])] for t in depths}
    overrides = {t: get(f"{t}_layers", None) for t in depths}
    overrides = {t: v for t, v in overrides.items() if v is not None}
    return tower_layers(
        depths,
        layer_scheme=get("layer_scheme", "even"),
        deep_layer_scheme=get("deep_layer_scheme", "even_all"),
        stride_rule=get("group_stride", "script"),
        layerdrop=bool(get("layerdrop", True)),
        include_embedding_state=bool(get("include_embedding_state", True)),
        overrides=overrides,
    )
