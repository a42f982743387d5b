"""The user encoder of every plugin model: SASRec-style transformer blocks over item embeddings.

Two block implementations, chosen by ``user_encoder`` (resolved per protocol by
``config.resolve_protocol``):

- ``recbole``: RecBole's own ``TransformerEncoder`` (SASRec's post-LN blocks, with Q/K/V/O biases),
  on RecBole's left-aligned sequences: RecBole's protocol default;
- ``authors``: :class:`AuthorsTransformer`, the blocks of the authors' public code
  (github.com/GAIR-Lab/IISAN, the SASRec user encoder of ``Code_Cached``): no Q/K/V/O biases,
  Xavier-normal initialisation, absolute positions on right-aligned (left-padded) windows so the
  most recent item always sits at the last position: the paper protocol's default (IISAN, SIGIR
  2024, arXiv:2404.02059, Sec. 3.4 "user encoder"; IISAN-Versa, TKDE, arXiv:2411.02992, Sec. III).

The model (:class:`~recbole_iisan.model.abstract.SideNetworkRecommender`) owns the positions,
input LayerNorm and dropout around the blocks, so both kinds keep the same parameter names.
"""
from __future__ import annotations

from typing import Any

import torch
from recbole.model.layers import TransformerEncoder
from torch import nn

from recbole_iisan.utils.errors import PluginConfigError

USER_ENCODERS = ("authors", "recbole")
USER_ENCODER_INITS = ("normal", "xavier")


class AuthorsTransformer(nn.Module):
    """The authors' user encoder blocks: post-LN, multi-head attention with
    no Q/K/V/O biases, FFN d -> inner -> d with ReLU, LayerNorm eps ``layer_norm_eps``; attention
    mask: causal and key padding (-1e9), on RIGHT-aligned (left-padded) sequences.

    ``forward(x [B, L, d], real [B, L] bool)`` -> ``[B, L, d]``."""

    def __init__(self, n_layers: int, n_heads: int, hidden_size: int, inner_size: int,
                 hidden_dropout_prob: float, attn_dropout_prob: float, layer_norm_eps: float) -> None:
        super().__init__()
        if hidden_size % n_heads:
            raise PluginConfigError(f"config key 'n_heads': {n_heads} does not divide embedding_size {hidden_size}")
        self.n_heads = n_heads
        self.blocks = nn.ModuleList()
        for _ in range(n_layers):
            block = nn.ModuleDict({
                "q": nn.Linear(hidden_size, hidden_size, bias=False),
                "k": nn.Linear(hidden_size, hidden_size, bias=False),
                "v": nn.Linear(hidden_size, hidden_size, bias=False),
                "o": nn.Linear(hidden_size, hidden_size, bias=False),
                "attn_norm": nn.LayerNorm(hidden_size, eps=layer_norm_eps),
                "ffn_in": nn.Linear(hidden_size, inner_size),
                "ffn_out": nn.Linear(inner_size, hidden_size),
                "ffn_norm": nn.LayerNorm(hidden_size, eps=layer_norm_eps),
            })
            self.blocks.append(block)
        self.attn_dropout = nn.Dropout(attn_dropout_prob)
        self.dropout = nn.Dropout(hidden_dropout_prob)

    def forward(self, x: torch.Tensor, real: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``[B, L, d]``; with ``last_only`` ``[B, 1, d]``: the last block computes only position L-1
        (its query, attention row, residuals and FFN; keys and values over every position)."""
        B, L, d = x.shape
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, :, :] & real[:, None, :]  # [B, Lq, Lk]
        bias = torch.zeros(B, 1, L, L, dtype=x.dtype, device=x.device).masked_fill(~allowed[:, None], -1e9)
        for i, blk in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            x = self._block(blk, x, bias[:, :, -1:] if last else bias, x[:, -1:] if last else x)
        return x

    def _block(self, blk: nn.ModuleDict, x: torch.Tensor, bias: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """One block over keys/values ``x [B, L, d]`` for the positions ``query [B, Lq, d]`` (``bias``
        ``[B, 1, Lq, L]``) -> ``[B, Lq, d]``."""
        B, L, d = x.shape
        h, lq = self.n_heads, query.size(1)

        def heads(t, n):
            return t.view(B, n, h, d // h).transpose(1, 2)  # [B, h, n, dk]
        q, k, v = heads(blk["q"](query), lq), heads(blk["k"](x), L), heads(blk["v"](x), L)
        att = (q @ k.transpose(-1, -2)) / (d // h) ** 0.5 + bias
        att = self.attn_dropout(torch.softmax(att, dim=-1))
        ctx = (att @ v).transpose(1, 2).reshape(B, lq, d)
        y = blk["attn_norm"](query + self.dropout(blk["o"](ctx)))
        return blk["ffn_norm"](y + self.dropout(blk["ffn_out"](torch.relu(blk["ffn_in"](y)))))


def build_transformer(kind: str, config: Any, hidden_size: int) -> nn.Module:
    """The transformer blocks of user encoder ``kind`` (``authors`` or ``recbole``) from the
    config's ``n_layers``, ``n_heads``, ``inner_size``, dropouts, ``hidden_act``, ``layer_norm_eps``."""
    common = dict(n_layers=int(config["n_layers"]), n_heads=int(config["n_heads"]), hidden_size=hidden_size,
                  inner_size=int(config["inner_size"]), hidden_dropout_prob=float(config["hidden_dropout_prob"]),
                  attn_dropout_prob=float(config["attn_dropout_prob"]),
                  layer_norm_eps=float(config["layer_norm_eps"]))
    if kind == "authors":
        return AuthorsTransformer(**common)
    return TransformerEncoder(hidden_act=str(config["hidden_act"]), **common)
