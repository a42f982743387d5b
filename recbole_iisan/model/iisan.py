"""IISAN (SIGIR 2024) and IISAN-Versa (TKDE) as RecBole sequential recommenders.

One item side for every variant: a :class:`~recbole_iisan.model.layers.SideNetwork` reading a
*state source*. :class:`IISANVS` (symmetric: equal tower widths and depths, heads ``D->D->d``) and
:class:`IISANVA` (asymmetric: any widths and depths, DTLs in the inter tower, group LayerDrop,
heads ``D->d->d``) read the cache (:class:`~recbole_iisan.model.states.CachedStates`);
:class:`IISANUncached` is IISAN with a live state source (the frozen backbones run in the step).

Item embedding, for towers A (``dataset.towers[0]``, the paper's "text") and B (the "image"):

    e_item = fusion([head_B(intra_B(h_B)), head_A(intra_A(h_A)), head_inter(inter(h_A, h_B))])

The user encoder, loss, item table and optimiser groups are
:class:`~recbole_iisan.model.abstract.SideNetworkRecommender`'s.
"""
from __future__ import annotations

import torch
from torch import nn

from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.model.abstract import MIXED_PRECISION, SideNetworkRecommender, check_choice
from recbole_iisan.model.layers import ACTIVATIONS, FUSIONS, HEAD_TYPES, MODALITIES, SideNetwork, SideNetworkConfig
from recbole_iisan.model.states import Backbones, CachedStates, LiveStates

LR_GROUPS = ("recsys", "text_sanb", "image_sanb", "image_head", "text_head")


class IISANBase(SideNetworkRecommender):
    """IISAN's side network on a state source + the shared user encoder, loss and evaluation.

    Config keys (defaults in ``properties/IISAN.yaml`` and the per-model deltas): ``embedding_size``,
    ``sanb_size``, ``inter_sanb_size``, ``sanb_activation``, ``head_type``, ``modality``, ``fusion``,
    ``frozen_backbone``, ``state_norm``, ``iisan_lr`` and the shared keys of the abstract model.
    """

    properties = ("IISAN",)

    def _build_item_side(self, config, dataset) -> None:
        for key, allowed in [("head_type", HEAD_TYPES), ("modality", MODALITIES), ("fusion", FUSIONS),
                             ("sanb_activation", ACTIVATIONS)]:
            check_choice(key, str(config[key]).lower() if key == "sanb_activation" else str(config[key]), allowed)
        lrs = dict(config["iisan_lr"] or {})
        unknown = sorted(set(lrs) - set(LR_GROUPS))
        if unknown:
            raise PluginConfigError(f"config key 'iisan_lr': unknown group(s) {unknown}; the groups are {list(LR_GROUPS)}")
        lacking = sorted(set(LR_GROUPS[1:]) - set(lrs))
        if lacking:
            raise PluginConfigError(f"config key 'iisan_lr' lacks the group(s) {lacking}: give all of {list(LR_GROUPS[1:])}")
        self.iisan_lr = {k: float(v) for k, v in lrs.items()}
        self.iisan_lr.setdefault("recsys", self.learning_rate)

        self.states = self._state_source(config, dataset)
        self.towers = list(self.states.towers)
        self.tower_a, self.tower_b = self.towers
        self.state_layers = self.states.layers
        self.encoder_depths = self.states.depths
        (self.n_rows_a, self.dim_a), (self.n_rows_b, self.dim_b) = (self.states.shapes[t] for t in self.towers)
        self._validate_towers()
        side = SideNetworkConfig.from_config(config, (self.n_rows_a, self.dim_a), (self.n_rows_b, self.dim_b))
        if side.frozen_backbone and side.modality != "intra":
            self.logger.info("frozen_backbone: no side networks; fusing the two tower heads (modality ignored)")
        self.side = SideNetwork(side)
        self._build_id_embedding(config, dataset)

    def _build_id_embedding(self, config, dataset) -> None:
        """``item_id_embedding: True``: a learned ID embedding (zero-initialised) added to the content
        embedding of the items seen in training; unseen and new items stay content only."""
        self.id_embedding = None
        if not bool(config["item_id_embedding"]):
            return
        import torch

        from recbole_iisan.data.dataset import training_frequency

        seen = torch.as_tensor(training_frequency(dataset, self.n_items) > 0, dtype=torch.float32)
        self.id_embedding = nn.Embedding(self.n_items, self.embedding_size)
        nn.init.zeros_(self.id_embedding.weight)
        self.register_buffer("id_seen", seen.unsqueeze(1), persistent=False)

    def _state_source(self, config, dataset) -> nn.Module:
        return CachedStates(dataset, self.n_items, str(config["state_norm"]), type(self).__name__)

    def _validate_towers(self) -> None:
        """Hook for the VS checks."""

    def _describe_item_side(self) -> str:
        return (f" (rows {self.tower_a}={self.state_layers[self.tower_a]}, "
                f"{self.tower_b}={self.state_layers[self.tower_b]})")

    def _state_key(self) -> tuple:
        return self.states.key()

    def item_embeddings(self, ids):
        """``[M, d]`` for item ids ``ids [M]`` (or a ``slice`` of the ids, read from the cache in place)."""
        with self._autocast():
            if self.side.fused and hasattr(self.states, "rows_first") and not torch.is_autocast_enabled(self._device().type):
                e = self.side(*self.states.rows_first(ids), rows_first_states=True)
            else:
                e = self.side(*self.states(ids))
        if self.id_embedding is not None:
            return e.float() + self.id_embedding.weight[ids] * self.id_seen[ids]
        return e.float()

    def compute_item_table(self):
        """Every item's embedding, ``tower_batch_size`` items per pass, read from the cache in place."""
        n, step = self.n_items, self.tower_batch_size
        if not hasattr(self.states, "rows_first"):
            return super().compute_item_table()
        return torch.cat([self.item_embeddings(slice(s, min(s + step, n))) for s in range(0, n, step)], dim=0)

    # ------------------------------------------------------------------ optimiser, reporting
    def item_side_groups(self):
        groups = self.side.lr_groups()
        return [(name, groups[name], self.iisan_lr[name]) for name in LR_GROUPS[1:]]

    def recsys_lr(self) -> float:
        return self.iisan_lr["recsys"]

    def item_side_counts(self) -> dict[str, int]:
        counts = self.side.part_counts(self.tower_a, self.tower_b)
        counts["side network"] = sum(counts.values())
        return counts

    def gate_values(self) -> dict[str, list[float]]:
        return self.side.gate_values(self.tower_a, self.tower_b)


class IISANVS(IISANBase):
    """IISAN (symmetric): two towers of equal width and depth; heads ``D -> D -> d``."""

    properties = ("IISAN", "IISANVS")

    def _validate_towers(self) -> None:
        if self.dim_a != self.dim_b or self.n_rows_a != self.n_rows_b:
            raise PluginConfigError(
                f"IISANVS needs towers of equal width and row count; got {self.tower_a} "
                f"[{self.n_rows_a} rows x {self.dim_a}] and {self.tower_b} [{self.n_rows_b} rows x {self.dim_b}]. "
                "Use IISANVA for encoders of different sizes."
            )
        depths = self.encoder_depths
        if len(depths) == 2 and len(set(depths.values())) != 1:
            raise PluginConfigError(
                f"IISANVS needs encoders of equal depth, got {depths}. Use IISANVA for encoders of different sizes."
            )


class IISANVA(IISANBase):
    """IISAN-Versa (asymmetric): any widths and depths; DTLs in the inter tower when the widths
    differ, top-aligned pairing when the row counts differ; heads ``D -> d -> d``."""

    properties = ("IISAN", "IISANVA")


class IISANUncached(IISANBase):
    """IISAN with a live state source: the frozen backbones compute the selected hidden states in
    every step (eval mode, no grad) from the items' raw inputs. With the same side-network weights
    its item embeddings equal the cached IISAN's up to the cache's storage precision."""

    properties = ("IISAN", "IISANUncached")
    item_inputs = "raw"

    def _state_source(self, config, dataset) -> nn.Module:
        from recbole_iisan.towers.layer_select import tower_layers_from_config

        backbones = Backbones(dataset, self.n_items, MIXED_PRECISION[self.mixed_precision], always_eval=True,
                              model=type(self).__name__)
        return LiveStates(backbones, tower_layers_from_config(config, backbones.depths))
