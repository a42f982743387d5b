"""RecBole datasets for the plugin.

``ProtocolSequentialDataset`` is RecBole's ``SequentialDataset`` plus the users' full histories
(for ``mask_history``) and the paper's protocol as an option (``paper_protocol: True``: each
user's sequence is cut to its most recent ``MAX_ITEM_LIST_LENGTH + 3`` interactions before
anything else, and one training window per user, as the authors do). Every
sequential model the plugin runs, RecBole's SASRec/GRU4Rec included, uses it, so all models see
the same split.

``MultimodalSequentialDataset`` adds, per tower, the cached frozen-encoder states as ONE
contiguous tensor ``[n_items, n_rows, dim]`` in RecBole's internal item-id order (row 0 = the
padding item, zeros). It only loads: the caches are built before any dataset
(``recbole_iisan.data.utils.prepare_inputs``), which leaves their folders in ``config["item_state_caches"]``.
They are loaded once; RecBole's split copies share them.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils.enum_type import FeatureSource, FeatureType
from recbole_iisan.utils.errors import CacheError
from recbole_iisan.utils.files import setting





HISTORY_LENGTH_FIELD = "history_length"


def training_frequency(train_dataset: Any, n_items: int) -> np.ndarray:
    """``[n_items]`` interactions per item in the training split of a sequential dataset: every
    training target, plus each user's first item (the input of the user's first training example)."""
    feat = train_dataset.inter_feat
    iid = train_dataset.iid_field
    seq_f, len_f = iid + train_dataset.config["LIST_SUFFIX"], train_dataset.config["ITEM_LIST_LENGTH_FIELD"]
    targets = feat[iid].numpy()
    counts = np.bincount(targets, minlength=n_items)
    if seq_f in feat and len_f in feat:
        first = feat[seq_f][:, 0].numpy()[feat[len_f].numpy() == 1]
        counts += np.bincount(first, minlength=n_items)
    return counts[:n_items]


class ProtocolSequentialDataset(SequentialDataset):
    """RecBole's SequentialDataset with the paper's protocol as an option, and each user's full
    history for ranking.

    Every split row carries ``history_length`` (the number of the user's interactions before its
    target, unbounded by ``MAX_ITEM_LIST_LENGTH``) and the dataset holds every user's sequence
    (``user_history``: all item ids, by user then time; ``user_history_offset[u]``: where user u
    starts), so that the trainer can mask the user's whole history at ranking (``mask_history``)
    for every sequential model: ``user_history[offset[u] : offset[u] + history_length]``.

    ``paper_protocol: True`` (the authors' data pipeline, github.com/GAIR-Lab/IISAN; IISAN-Versa,
    arXiv:2411.02992, Sec. V-A and Table I): each user's sequence is cut to its
    ``MAX_ITEM_LIST_LENGTH + 3`` most recent interactions before anything else; validation and
    test are RecBole's leave-one-out rows (the up-to-10 items before the target). For a model whose
    loss reads every position (``loss_positions: all``), the training split holds ONE row per user
    (RecBole's prefix augmentation dropped): the user's last training row, whose ``item_id_list``
    is the train sequence ``s[0:L-3]`` and whose target is ``s[L-3]``, so that its slots
    (``model/loss.py build_slots``) are the whole train sequence ``s[0:L-2]`` and position j
    predicts slot j+1 (the authors' window). Models whose loss reads the last position keep
    RecBole's prefixes of the same train sequence: the same (user, position, target) triples.
    """

    @property
    def one_window_per_user(self) -> bool:
        """The training split as one window per user: under the paper protocol, for a model whose
        loss reads every position of the window (``loss_positions: all``, IISAN's default there).
        Every other sequential model (RecBole's SASRec, GRU4Rec, ...: loss at the last position)
        keeps RecBole's prefix augmentation inside the same truncated sequences, which yields the
        same (user, position, target) triples: equal supervision."""
        return bool(setting(self.config, "paper_protocol")) and self.config["loss_positions"] == "all"

    def data_augmentation(self) -> None:
        # the users' full sequences (after filtering, in time order) before RecBole's augmentation
        self.sort(by=[self.uid_field, self.time_field], ascending=True)
        uids = self.inter_feat[self.uid_field].numpy()
        items = self.inter_feat[self.iid_field].numpy()
        n = len(uids)
        starts = np.flatnonzero(np.r_[True, uids[1:] != uids[:-1]]) if n else np.zeros(0, dtype=np.int64)
        group_start = np.repeat(starts, np.diff(np.r_[starts, n])) if n else np.zeros(0, dtype=np.int64)
        pos = np.arange(n) - group_start  # position of each interaction in its user's sequence
        offsets = np.zeros(self.user_num, dtype=np.int64)
        offsets[uids[starts]] = starts
        super().data_augmentation()
        # RecBole's augmentation emits, per user in time order, one row per interaction but the
        # first: the row of interaction i has history length pos[i]
        self.user_history = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64))  # O(interactions)
        self.user_history_offset = torch.from_numpy(offsets)
        self.set_field_property(HISTORY_LENGTH_FIELD, FeatureType.TOKEN, FeatureSource.INTERACTION, 1)
        self.inter_feat.update(Interaction({HISTORY_LENGTH_FIELD: torch.from_numpy(pos[pos > 0].copy())}))

    def build(self):
        datasets = super().build()
        if self.one_window_per_user:
            train = datasets[0]
            feat = train.inter_feat
            uid = feat[self.uid_field].numpy()
            hlen = feat[HISTORY_LENGTH_FIELD].numpy()
            order = np.lexsort((hlen, uid))  # by user, then history length: the last row of a user is its window
            last = order[np.r_[uid[order][1:] != uid[order][:-1], True]]
            before = len(feat)
            train.inter_feat = feat[torch.from_numpy(np.sort(last))]
            self.logger.info(f"paper protocol: one training window per user ({len(last)} training sequences "
                             f"instead of RecBole's {before} augmented prefixes)")
        return datasets

    def _data_filtering(self) -> None:
        super()._data_filtering()
        if setting(self.config, "paper_protocol"):
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
        from recbole_iisan.data.cache import storage as state_store
        from recbole_iisan.data.cache.layout import read_manifest
        from recbole_iisan.data.cache.paths import encoder_depth, model_layers, tower_specs_for

        paths = self.config["item_state_caches"]
        if not paths:
            raise CacheError(
                "the encoder caches are not prepared: the dataset only loads them; run "
                "recbole_iisan.data.utils.prepare_inputs(config) (or python -m recbole_iisan.build_cache) first")
        specs = {s.name: s for s in tower_specs_for(self.config)}
        layers = model_layers(self.config, list(specs.values()))
        dtype = getattr(torch, str(setting(self.config, "cache_dtype")))
        # internal id -> token; row 0 is the padding token "[PAD]"
        tokens = [str(t) for t in self.field2id_token[self.iid_field][1:]]
        self.towers = list(specs)
        self.item_states: dict[str, torch.Tensor] = {}
        self.item_state_layers: dict[str, list[int]] = {}
        self.encoder_depths: dict[str, int] = {}
        self.missing_items: dict[str, int] = {}

        # memory (one padded tensor filled straight from LMDB) or a memory-mapped file (catalogues
        # larger than RAM); auto picks by the states' size against the available memory
        total = sum(state_store.state_bytes(len(tokens), len(layers[n]), int(read_manifest(paths[n])["dim"]),
                                            dtype) for n in self.towers)
        storage = state_store.choose_storage(str(setting(self.config, "state_storage")), total)
        self.state_storage = storage
        for name in self.towers:
            full, missing = state_store.load_item_states(paths[name], tokens, layers[name], dtype=dtype, storage=storage)
            self.item_states[name] = full
            self.item_state_layers[name] = list(layers[name])
            self.encoder_depths[name] = encoder_depth(specs[name])
            self.missing_items[name] = len(missing)
            if specs[name].is_image:
                from recbole_iisan.data.images import check_missing_images

                check_missing_images(self.config, name, [tokens[i] for i in missing], len(tokens), "zero states")
            elif missing:
                raise CacheError(
                    f"tower '{name}': {len(missing)} of {len(tokens)} items of the dataset have no cached state "
                    f"(first: {[tokens[i] for i in missing[:5]]}); re-run build_cache")
            mb = full.numel() * full.element_size() / 2**20
            self.logger.info(
                f"tower '{name}': item states {tuple(full.shape)} {full.dtype} ({mb:.1f} MB, {storage}), "
                f"hidden states {self.item_state_layers[name]}"
            )
