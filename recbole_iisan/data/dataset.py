"""RecBole datasets for the plugin.

``ProtocolSequentialDataset`` is RecBole's ``SequentialDataset`` plus the paper's protocol as an
option (``paper_protocol: True``: each user's sequence is cut to its most recent
``MAX_ITEM_LIST_LENGTH + 3`` interactions before anything else, as the authors do). Every
sequential model the plugin runs, RecBole's SASRec/GRU4Rec included, uses it, so all models see
the same split.

``MultimodalSequentialDataset`` adds, per tower, the cached frozen-encoder states as ONE
contiguous tensor ``[n_items, n_rows, dim]`` in RecBole's internal item-id order (row 0 = the
padding item, zeros). It only loads: the caches are built before any dataset
(``quick_start.prepare_inputs``), which leaves their folders in ``config["item_state_caches"]``.
They are loaded once; RecBole's split copies share them.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset
from recbole_iisan.utils import config_get as _config_get

logger = logging.getLogger()




class ProtocolSequentialDataset(SequentialDataset):
    """RecBole's SequentialDataset with the paper's truncation as an option."""

    def _data_filtering(self) -> None:
        super()._data_filtering()
        if _config_get(self.config, "paper_protocol", False):
            self._truncate_to_recent()

    def _truncate_to_recent(self) -> None:
        """Keep each user's most recent ``MAX_ITEM_LIST_LENGTH + 3`` interactions (the paper's
        ``max_seq_len + 3``), ordered by time; ties keep file order."""
        keep = int(self.config["MAX_ITEM_LIST_LENGTH"]) + 3
        feat = self.inter_feat
        order = np.lexsort((np.arange(len(feat)), feat[self.time_field].to_numpy(), feat[self.uid_field].to_numpy()))
        feat = feat.iloc[order]
        rank_from_end = feat.groupby(self.uid_field, sort=False).cumcount(ascending=False)
        before = len(feat)
        self.inter_feat = feat[rank_from_end.to_numpy() < keep]
        self.logger.info(
            f"paper protocol: kept the last {keep} interactions per user "
            f"({len(self.inter_feat)} of {before} interactions)"
        )
        self._reset_index()


class MultimodalSequentialDataset(ProtocolSequentialDataset):
    """A sequential dataset that also serves each item's cached encoder states.

    Attributes (set after RecBole's loading and remapping):
        towers: the two tower names, in order (tower A first).
        item_states: tower -> ``[n_items, n_rows, dim]`` tensor (``cache_dtype``), row 0 zeros.
        item_state_layers: tower -> hidden-state indices of the rows.
        encoder_depths: tower -> number of encoder blocks.
        missing_items: tower -> number of items with no cached state (zeros rows).
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._load_item_states()

    def _load_item_states(self) -> None:
        from recbole_iisan.data import cache as cache_mod

        paths = self.config["item_state_caches"]
        if not paths:
            raise cache_mod.CacheError(
                "the encoder caches are not prepared: the dataset only loads them; run "
                "recbole_iisan.quick_start.prepare_inputs(config) (or python -m recbole_iisan.build_cache) first")
        specs = {s.name: s for s in cache_mod.tower_specs_for(self.config)}
        layers = cache_mod.model_layers(self.config, list(specs.values()))
        dtype = getattr(torch, str(_config_get(self.config, "cache_dtype", "float16")))
        # internal id -> token; row 0 is the padding token "[PAD]"
        tokens = [str(t) for t in self.field2id_token[self.iid_field][1:]]
        self.towers = list(specs)
        self.item_states: dict[str, torch.Tensor] = {}
        self.item_state_layers: dict[str, list[int]] = {}
        self.encoder_depths: dict[str, int] = {}
        self.missing_items: dict[str, int] = {}
        for name in self.towers:
            states, missing = cache_mod.load_states(paths[name], tokens, layers[name], dtype=dtype)
            full = torch.zeros((len(tokens) + 1,) + tuple(states.shape[1:]), dtype=states.dtype)
            full[1:] = states
            self.item_states[name] = full
            self.item_state_layers[name] = list(layers[name])
            self.encoder_depths[name] = cache_mod.encoder_depth(specs[name])
            self.missing_items[name] = len(missing)
            policy = _config_get(self.config, "missing_image", "error")
            if missing:
                first = [tokens[i] for i in missing[:5]]
                if specs[name].is_image and policy == "zeros":
                    self.logger.warning(
                        f"tower '{name}': {len(missing)} of {len(tokens)} items have no image; "
                        f"their states are zeros (missing_image: zeros). First: {first}"
                    )
                else:
                    raise cache_mod.CacheError(
                        f"tower '{name}': {len(missing)} of {len(tokens)} items of the dataset have no "
                        f"cached state (first: {first}); "
                        + ("set missing_image: zeros to train with zero states for them"
                           if specs[name].is_image else "re-run build_cache")
                    )
            mb = full.numel() * full.element_size() / 2**20
            self.logger.info(
                f"tower '{name}': item states {tuple(full.shape)} {full.dtype} ({mb:.1f} MB), "
                f"hidden states {self.item_state_layers[name]}"
            )
