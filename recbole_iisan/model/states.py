"""State sources: where IISAN's side network gets the backbones' hidden states from.

- :class:`CachedStates`: the rows of the frozen-encoder cache, one tensor per tower
  ``[n_items, n_rows, D]`` held as non-persistent buffers (they follow ``.to(device)`` and stay out
  of checkpoints) and gathered by item id.
- :class:`LiveStates`: the same rows computed in the step by the frozen backbones
  (:class:`Backbones`) from the items' raw inputs (IISANUncached, the paper's "uncached" IISAN).

:class:`Backbones` also serves the end-to-end baselines (FFT, Adapter, LoRA, BitFit), whose
backbones train. Tokenising, padding and pooling are ``recbole_iisan.towers.encoders``'s, the
same functions the cache builder uses.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from recbole_iisan.utils.buffers import ReusedBuffers
from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.towers.encoders import (encoder_info, load_backbone, pool_hidden, resolve_pooling,
                                           text_model_inputs)

STATE_NORMS = ("none", "dim")


def standardize_states(states: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per hidden-state row and dimension, standardise the frozen states over the real items
    (row 0, the padding item, stays zero): ``(h - mean) / std``. A fixed, non-trainable
    preprocessing for encoders with massive activations (decoder LLMs: SmolLM2's middle layers
    reach |h| ~ 2e4 on the first token), which otherwise dominate the towers' gated sums."""
    real = states[1:].float()
    mean = real.mean(dim=0, keepdim=True)
    std = real.std(dim=0, keepdim=True).clamp_min(eps)
    out = torch.zeros_like(states)
    out[1:] = ((real - mean) / std).to(states.dtype)
    return out


def gather_rows_first(states: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype = torch.float32,
                      buffers: Optional["ReusedBuffers"] = None) -> torch.Tensor:
    """``states[ids].transpose(0, 1)`` as a contiguous ``[n, M, D]`` tensor of ``dtype``: one gather
    and one conversion per row (``results/speed/step_speed.md``: cheaper than gathering ``[M, n, D]``
    and converting each strided row when the towers read it, in the forward and again in the
    backward), written into a buffer of ``buffers`` when one is free."""
    n, dim = states.size(1), states.size(2)
    shape = (n, ids.numel(), dim)
    out = buffers.take(shape, dtype, states.device) if buffers is not None else \
        torch.empty(shape, dtype=dtype, device=states.device)
    for j in range(n):
        out[j].copy_(states[:, j].index_select(0, ids))
    return out


def _dataset_towers(dataset, needed: tuple, what: str, dataset_class: str, model: str) -> list[str]:
    missing = [a for a in needed if not hasattr(dataset, a)]
    if missing:
        raise TypeError(f"{model} needs a dataset with {what} (missing {missing}); build it with {dataset_class}")
    towers = list(dataset.towers)
    if len(towers) != 2:
        raise PluginConfigError(f"{model} needs exactly two towers, the dataset has {towers}")
    return towers


class CachedStates(nn.Module):
    """The cached rows of towers A and B, gathered by item id: ``forward(ids) -> (h_a, h_b)`` fp32."""

    def __init__(self, dataset, n_items: int, state_norm: str = "none", model: str = "IISAN"):
        super().__init__()
        if state_norm not in STATE_NORMS:
            raise PluginConfigError(f"config key 'state_norm': expected one of {list(STATE_NORMS)}, got {state_norm!r}")
        self.towers = _dataset_towers(dataset, ("towers", "item_states", "item_state_layers"), "cached item states",
                                      "recbole_iisan.data.dataset.MultimodalSequentialDataset", model)
        states = [dataset.item_states[t] for t in self.towers]
        for t, s in zip(self.towers, states):
            if s.dim() != 3 or s.size(0) != n_items:
                raise PluginConfigError(f"tower '{t}': item states must be [n_items={n_items}, n_rows, dim], "
                                        f"got {list(s.shape)}")
            rows = list(dataset.item_state_layers[t])
            if len(rows) != s.size(1):
                raise PluginConfigError(f"tower '{t}': {s.size(1)} state rows but item_state_layers lists {rows}")
        self.layers = {t: list(dataset.item_state_layers[t]) for t in self.towers}
        depths = dict(getattr(dataset, "encoder_depths", {}) or {})
        self.depths = {t: int(depths[t]) for t in self.towers if t in depths}
        self.shapes = {t: (int(s.shape[1]), int(s.shape[2])) for t, s in zip(self.towers, states)}
        if state_norm != "none":
            states = [standardize_states(s) for s in states]
        self.register_buffer("states_a", states[0], persistent=False)
        self.register_buffer("states_b", states[1], persistent=False)
        self._row_buffers = ReusedBuffers()

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.states_a[ids].float(), self.states_b[ids].float()

    def rows_first(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n_a, M, D_a], [n_b, M, D_b])``, rows first. ``ids``: item ids (a training step: the rows
        are gathered into contiguous fp32 ``[M, D]`` matrices, converted once, so neither the forward
        nor the backward's recomputation copies them again), or a ``slice`` of them (the item table:
        views of the cache in place, in its dtype; the fused side network converts a row to fp32 as it
        reads it)."""
        if isinstance(ids, slice):
            return self.states_a[ids].transpose(0, 1), self.states_b[ids].transpose(0, 1)
        return (gather_rows_first(self.states_a, ids, buffers=self._row_buffers),
                gather_rows_first(self.states_b, ids, buffers=self._row_buffers))

    def key(self) -> tuple:
        return (self.states_a.data_ptr(), self.states_b.data_ptr())


class Backbones(nn.Module):
    """The two towers' Hugging Face backbones on the items' raw inputs (``RawInputSequentialDataset``).

    ``run(tower, ids, hidden_states)`` runs a backbone on items ``ids``; ``pooled_last`` pools its last
    hidden state, ``hidden_rows`` the selected hidden states (what the cache stores). Which parameters
    train is the owning model's choice; ``always_eval`` keeps frozen backbones in eval mode.
    """

    def __init__(self, dataset, n_items: int, mixed_precision: Optional[torch.dtype] = None,
                 always_eval: bool = False, model: str = "IISAN"):
        super().__init__()
        self.towers = _dataset_towers(dataset, ("towers", "item_inputs", "tower_specs"), "raw item inputs",
                                      "recbole_iisan.data.raw_inputs.RawInputSequentialDataset", model)
        self.specs = {t: dataset.tower_specs[t] for t in self.towers}
        self.models = nn.ModuleDict({t: load_backbone(self.specs[t].encoder, t, drop_pooler=True) for t in self.towers})
        infos = {t: encoder_info(self.specs[t].encoder, t) for t in self.towers}
        self.is_image = {t: bool(self.specs[t].is_image) for t in self.towers}
        self.is_decoder = {t: bool(infos[t].is_decoder) for t in self.towers}
        self.pooling = {t: resolve_pooling(self.specs[t].pooling, infos[t].is_decoder, self.is_image[t])
                        for t in self.towers}
        self.depths = {t: int(infos[t].n_layers) for t in self.towers}
        self.dims = {t: int(infos[t].dim) for t in self.towers}
        self.mixed_precision = mixed_precision
        self.always_eval = always_eval
        for t in self.towers:
            for key, value in dataset.item_inputs[t].items():
                if key in ("input_ids", "attention_mask", "pixels") and value.size(0) != n_items:
                    raise ValueError(f"tower '{t}': {key} has {value.size(0)} rows, expected n_items={n_items}")
                self.register_buffer(f"_in_{t}_{key}", value, persistent=False)

    def train(self, mode: bool = True):
        return super().train(False if self.always_eval else mode)

    def _autocast(self):
        device = getattr(self, f"_in_{self.towers[0]}_" + ("pixels" if self.is_image[self.towers[0]] else "input_ids")).device
        if self.mixed_precision is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.mixed_precision)

    def inputs(self, tower: str, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """The backbone's keyword inputs for item ids ``[M]`` and the token mask (text)."""
        if self.is_image[tower]:
            pix = getattr(self, f"_in_{tower}_pixels")[ids]
            mean = getattr(self, f"_in_{tower}_mean").view(1, -1, 1, 1)
            std = getattr(self, f"_in_{tower}_std").view(1, -1, 1, 1)
            rescale = getattr(self, f"_in_{tower}_rescale")
            return {"pixel_values": (pix.float() * rescale - mean) / std}, None
        input_ids = getattr(self, f"_in_{tower}_input_ids")[ids]
        mask = getattr(self, f"_in_{tower}_attention_mask")[ids]
        if self.pooling[tower] != "mean_unmasked":
            # right padding: trimming to the batch's longest text changes no real token's state
            width = int(mask.sum(dim=1).max().item()) if mask.numel() else 1
            input_ids, mask = input_ids[:, :width], mask[:, :width]
        return text_model_inputs(input_ids, mask, self.pooling[tower]), mask

    def run(self, tower: str, ids: torch.Tensor, hidden_states: bool = False):
        """``(output, mask)`` of a tower's backbone on items ``ids``."""
        kwargs, mask = self.inputs(tower, ids)
        if self.is_decoder[tower]:
            kwargs["use_cache"] = False
        with self._autocast():
            out = self.models[tower](**kwargs, output_hidden_states=hidden_states, return_dict=True)
        return out, mask

    def pooled_last(self, tower: str, ids: torch.Tensor) -> torch.Tensor:
        """Pooled last hidden state ``[M, D]`` (fp32)."""
        out, mask = self.run(tower, ids)
        return pool_hidden(out.last_hidden_state, mask, self.pooling[tower]).float()

    def hidden_rows(self, tower: str, ids: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """``[M, len(layers), D]`` pooled selected hidden states (what the cache stores), fp32."""
        out, mask = self.run(tower, ids, hidden_states=True)
        return torch.stack([pool_hidden(out.hidden_states[i], mask, self.pooling[tower]) for i in layers], dim=1).float()


class LiveStates(nn.Module):
    """The cache's rows computed in the step by frozen backbones: ``forward(ids) -> (h_a, h_b)``."""

    def __init__(self, backbones: Backbones, layers: dict[str, list[int]]):
        super().__init__()
        self.backbones = backbones
        self.backbones.requires_grad_(False)
        self.towers = list(backbones.towers)
        self.layers = {t: list(layers[t]) for t in self.towers}
        self.depths = dict(backbones.depths)
        self.shapes = {t: (len(self.layers[t]), backbones.dims[t]) for t in self.towers}

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            a, b = self.towers
            return (self.backbones.hidden_rows(a, ids, self.layers[a]),
                    self.backbones.hidden_rows(b, ids, self.layers[b]))

    def key(self) -> tuple:
        return ()
