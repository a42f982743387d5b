"""IISAN (SIGIR 2024) and IISAN-Versa (TKDE) as RecBole sequential recommenders.

One code path, :class:`IISANBase`; :class:`IISANVS` (symmetric: equal tower widths and depths,
heads ``D->D->d``) and :class:`IISANVA` (asymmetric: any widths and depths, DTLs in the inter
tower, group LayerDrop chosen by the dataset, heads ``D->d->d``) only change defaults and checks.

Item embedding (iisan-method.md section 3), for towers A (``dataset.towers[0]``, the paper's
"text") and B (``dataset.towers[1]``, the paper's "image"):

    e_item = fusion([head_B(intra_B(h_B)), head_A(intra_A(h_A)), head_inter(inter(h_A, h_B))])

where ``h_*`` are the cached backbone rows of the item (non-persistent buffers, gathered by item
id). The user encoder is RecBole's SASRec encoder (post-LN ``TransformerEncoder``, learned
positions, LayerNorm, dropout) over the item embeddings of the sequence; the score of an item is
``<user, e_item>``. A training batch runs the towers once per distinct item id of the batch.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

import torch
from torch import nn
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import TransformerEncoder
from recbole.utils import InputType

from recbole_iisan.config import PluginConfigError
from recbole_iisan.model.layers import (
    FUSIONS,
    HEAD_TYPES,
    InterTower,
    IntraTower,
    make_inter_head,
    make_tower_head,
)
from recbole_iisan.model.loss import (
    LOSS_POSITIONS,
    LOSS_TYPES,
    build_slots,
    full_softmax_loss,
    inbatch_softmax_loss,
    popularity_log_prob,
)
from recbole_iisan.model.trainer import IISANTrainer
from recbole_iisan.utils import config_get as _get

MODALITIES = ("intra_inter", "intra", "inter")
MIXED_PRECISION = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_IISAN_LR = {"text_sanb": 1e-4, "image_sanb": 1e-4, "image_head": 1e-4, "text_head": 5e-5}
LR_GROUPS = ("recsys", "text_sanb", "image_sanb", "image_head", "text_head")


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




def _n_params(module: Optional[nn.Module]) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class IISANBase(SequentialRecommender):
    """The IISAN side network + SASRec-style user encoder on cached backbone states.

    Config keys (defaults in ``properties/IISANVS.yaml`` / ``IISANVA.yaml``): ``embedding_size``,
    ``sanb_size``, ``inter_sanb_size``, ``sanb_activation``, ``head_type``, ``modality``,
    ``fusion``, ``frozen_backbone``, ``loss_type``, ``loss_positions``, ``paper_protocol``,
    ``mixed_precision``, ``tower_batch_size``, ``iisan_lr``, ``user_encoder_init`` and the SASRec
    keys ``n_layers``, ``n_heads``, ``inner_size``, ``hidden_dropout_prob``, ``attn_dropout_prob``,
    ``hidden_act``, ``layer_norm_eps``, ``initializer_range``.
    """

    input_type = InputType.POINTWISE
    needs_item_states = True
    trainer_class = IISANTrainer
    default_head_type = "symmetric"
    requires_equal_towers = False

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.logger = logging.getLogger()
        self._read_config(config)
        self._attach_states(dataset)
        self._build_side_network()
        self._build_user_encoder()
        # popularity correction of the in-batch loss (from the training targets)
        targets = dataset.inter_feat[self.ITEM_ID]
        targets = torch.as_tensor(targets.numpy() if hasattr(targets, "numpy") else targets)
        self.register_buffer("log_pop", popularity_log_prob(targets, self.n_items), persistent=False)
        self._item_table: Optional[torch.Tensor] = None
        self._item_table_key = None
        self._log_parameter_counts()
        if self.mixed_precision == "fp16" and not _get(config, "enable_scaler", False):
            self.logger.warning(
                "mixed_precision: fp16 without RecBole's GradScaler (enable_scaler: True) may underflow "
                "gradients; bf16 needs no scaler"
            )

    # ------------------------------------------------------------------ set-up
    def _read_config(self, config) -> None:
        self.embedding_size = int(_get(config, "embedding_size", 64))
        self.hidden_size = self.embedding_size
        self.sanb_size = int(_get(config, "sanb_size", 64))
        self.inter_sanb_size = _get(config, "inter_sanb_size", None)
        self.sanb_activation = str(_get(config, "sanb_activation", "relu")).lower()
        self.head_type = str(_get(config, "head_type", self.default_head_type))
        self.modality = str(_get(config, "modality", "intra_inter"))
        self.fusion_mode = str(_get(config, "fusion", "gated"))
        self.frozen_backbone = bool(_get(config, "frozen_backbone", False))
        self.state_norm = str(_get(config, "state_norm", "none"))
        if self.state_norm not in STATE_NORMS:
            raise PluginConfigError(f"config key 'state_norm': expected one of {list(STATE_NORMS)}, got {self.state_norm!r}")
        self.loss_type = str(_get(config, "loss_type", "inbatch"))
        self.paper_protocol = bool(_get(config, "paper_protocol", False))
        positions = str(_get(config, "loss_positions", "last"))
        if positions == "auto":
            positions = "all" if self.paper_protocol else "last"
        self.loss_positions = positions
        self.mixed_precision = str(_get(config, "mixed_precision", "none")).lower()
        self.tower_batch_size = int(_get(config, "tower_batch_size", 4096))
        self.user_encoder_init = str(_get(config, "user_encoder_init", "normal"))
        self.n_layers = int(_get(config, "n_layers", 2))
        self.n_heads = int(_get(config, "n_heads", 2))
        self.inner_size = int(_get(config, "inner_size", 256))
        self.hidden_dropout_prob = float(_get(config, "hidden_dropout_prob", 0.1))
        self.attn_dropout_prob = float(_get(config, "attn_dropout_prob", 0.1))
        self.hidden_act = str(_get(config, "hidden_act", "relu"))
        self.layer_norm_eps = float(_get(config, "layer_norm_eps", 1e-6))
        self.initializer_range = float(_get(config, "initializer_range", 0.02))
        lrs = dict(DEFAULT_IISAN_LR)
        lrs["recsys"] = _get(config, "learning_rate", 2e-4)
        for k, v in dict(_get(config, "iisan_lr", {}) or {}).items():
            if k not in LR_GROUPS:
                raise PluginConfigError(f"iisan_lr: unknown group {k!r}; the groups are {LR_GROUPS}")
            lrs[k] = v
        self.iisan_lr = {k: float(v) for k, v in lrs.items()}

        checks = [
            ("modality", self.modality, MODALITIES),
            ("fusion", self.fusion_mode, FUSIONS),
            ("head_type", self.head_type, HEAD_TYPES),
            ("loss_type", self.loss_type, LOSS_TYPES),
            ("loss_positions", self.loss_positions, LOSS_POSITIONS),
            ("mixed_precision", self.mixed_precision, tuple(MIXED_PRECISION)),
            ("user_encoder_init", self.user_encoder_init, ("normal", "xavier")),
        ]
        for key, value, allowed in checks:
            if value not in allowed:
                raise PluginConfigError(f"config key '{key}': expected one of {list(allowed)}, got {value!r}")

    def _take_towers(self, dataset, needed: tuple, what: str, dataset_class: str) -> list:
        """Check that ``dataset`` has the attributes this model reads and two towers; set
        ``towers``, ``tower_a``, ``tower_b`` (shared by the cached and the in-the-loop models)."""
        missing = [a for a in needed if not hasattr(dataset, a)]
        if missing:
            raise TypeError(
                f"{type(self).__name__} needs a dataset with {what} (missing {missing}); "
                f"build it with {dataset_class}"
            )
        towers = list(dataset.towers)
        if len(towers) != 2:
            raise PluginConfigError(f"{type(self).__name__} needs exactly two towers, the dataset has {towers}")
        self.towers = towers
        self.tower_a, self.tower_b = towers
        return towers

    def _attach_states(self, dataset) -> None:
        towers = self._take_towers(dataset, ("towers", "item_states", "item_state_layers"), "cached item states",
                                   "recbole_iisan.data.dataset.MultimodalSequentialDataset")
        states = [dataset.item_states[t] for t in towers]
        for t, s in zip(towers, states):
            if s.dim() != 3 or s.size(0) != self.n_items:
                raise PluginConfigError(
                    f"tower '{t}': item states must be [n_items={self.n_items}, n_rows, dim], got {list(s.shape)}"
                )
            rows = list(dataset.item_state_layers[t])
            if len(rows) != s.size(1):
                raise PluginConfigError(f"tower '{t}': {s.size(1)} state rows but item_state_layers lists {rows}")
        self.state_layers = {t: list(dataset.item_state_layers[t]) for t in towers}
        depths = dict(getattr(dataset, "encoder_depths", {}) or {})
        self.encoder_depths = {t: int(depths[t]) for t in towers if t in depths}
        self.n_rows_a, self.dim_a = states[0].shape[1:]
        self.n_rows_b, self.dim_b = states[1].shape[1:]
        self._validate_towers()
        if self.state_norm != "none":
            states = [standardize_states(s) for s in states]
        # non-persistent: they follow .to(device) but stay out of checkpoints
        self.register_buffer("states_a", states[0], persistent=False)
        self.register_buffer("states_b", states[1], persistent=False)

    def _validate_towers(self) -> None:
        """Hook for the VS / VA checks."""

    def _build_side_network(self) -> None:
        d, r, act = self.embedding_size, self.sanb_size, self.sanb_activation
        self.intra_a = self.intra_b = self.inter = None
        self.head_a = self.head_b = self.head_inter = None
        if self.frozen_backbone:
            # "frozen backbone" ablation: a head on the last hidden state of each tower, no SANBs
            if self.modality != "intra":
                self.logger.info("frozen_backbone: no side networks; fusing the two tower heads (modality ignored)")
            self.head_a = make_tower_head(self.head_type, self.dim_a, d, image_side=False)
            self.head_b = make_tower_head(self.head_type, self.dim_b, d, image_side=True)
            n_parts = 2
        else:
            n_parts = 0
            if self.modality in ("intra_inter", "intra"):
                self.intra_a = IntraTower(self.dim_a, self.n_rows_a, r, act, self.fusion_mode)
                self.intra_b = IntraTower(self.dim_b, self.n_rows_b, r, act, self.fusion_mode)
                self.head_a = make_tower_head(self.head_type, self.dim_a, d, image_side=False)
                self.head_b = make_tower_head(self.head_type, self.dim_b, d, image_side=True)
                n_parts += 2
            if self.modality in ("intra_inter", "inter"):
                if self.inter_sanb_size is not None:
                    r_inter = int(self.inter_sanb_size)
                else:
                    # the authors: the narrower tower's down-size; text's when the widths are equal
                    r_inter = r
                self.inter = InterTower(self.dim_a, self.n_rows_a, self.dim_b, self.n_rows_b, r_inter, act,
                                        self.fusion_mode)
                self.head_inter = make_inter_head(self.inter.dim, d)
                n_parts += 1
        self.fusion = nn.Linear(n_parts * d, d)

    def _build_user_encoder(self) -> None:
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.trm_encoder = TransformerEncoder(
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            hidden_size=self.hidden_size,
            inner_size=self.inner_size,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attn_dropout_prob=self.attn_dropout_prob,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
        )
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)
        self.dropout = nn.Dropout(self.hidden_dropout_prob)
        for module in self.user_encoder_modules():
            module.apply(self._init_user_encoder)

    def _init_user_encoder(self, module: nn.Module) -> None:
        """SASRec's init (``normal``, RecBole) or the authors' (``xavier``); zero biases."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if self.user_encoder_init == "xavier":
                nn.init.xavier_normal_(module.weight)
            else:
                module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def user_encoder_modules(self) -> list[nn.Module]:
        return [self.position_embedding, self.trm_encoder, self.LayerNorm]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part (the side network and the user encoder)."""
        counts = {
            f"{self.tower_a} tower": _n_params(self.intra_a),
            f"{self.tower_b} tower": _n_params(self.intra_b),
            "inter tower": _n_params(self.inter),
            "heads": _n_params(self.head_a) + _n_params(self.head_b) + _n_params(self.head_inter),
            "fusion": _n_params(self.fusion),
            "user encoder": sum(_n_params(m) for m in self.user_encoder_modules()),
        }
        counts["side network"] = sum(v for k, v in counts.items() if k != "user encoder")
        counts["total"] = _n_params(self)
        return counts

    def _log_parameter_counts(self) -> None:
        counts = self.parameter_counts()
        parts = ", ".join(f"{k} {v:,}" for k, v in counts.items())
        self.logger.info(
            f"{type(self).__name__} trainable parameters: {parts} "
            f"(rows {self.tower_a}={self.state_layers[self.tower_a]}, {self.tower_b}={self.state_layers[self.tower_b]})"
        )

    # ------------------------------------------------------------------ item side
    def _autocast(self):
        dtype = MIXED_PRECISION[self.mixed_precision]
        if dtype is None or self.states_a.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Tower outputs + fusion for the item ids ``[M]`` -> ``[M, d]`` (fp32), one row per id."""
        h_a = self.states_a[ids].float()
        h_b = self.states_b[ids].float()
        with self._autocast():
            parts = []
            if self.frozen_backbone:
                parts = [self.head_b(h_b[:, -1]), self.head_a(h_a[:, -1])]
            else:
                if self.intra_a is not None:
                    parts.append(self.head_b(self.intra_b(h_b)))
                    parts.append(self.head_a(self.intra_a(h_a)))
                if self.inter is not None:
                    parts.append(self.head_inter(self.inter(h_a, h_b)))
            e = self.fusion(torch.cat(parts, dim=-1))
        return e.float()

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Item embeddings for an id tensor of any shape; the towers run once per distinct id."""
        uniq, inverse = torch.unique(ids, return_inverse=True)
        return self.item_embeddings(uniq)[inverse]

    def compute_item_table(self) -> torch.Tensor:
        """Every item's embedding, ``[n_items, d]``, in chunks of ``tower_batch_size`` items."""
        all_ids = torch.arange(self.n_items, device=self.states_a.device)
        return torch.cat([self.item_embeddings(c) for c in all_ids.split(self.tower_batch_size)], dim=0)

    def _table_key(self):
        # parameters are changed in place by optimisers and load_state_dict (version counter) or
        # replaced by .to() (data pointer); any change makes a new key
        params = tuple((p.data_ptr(), p._version) for p in self.parameters())
        return params + ((self.states_a.data_ptr(), self.states_b.data_ptr()),)

    def item_table(self) -> torch.Tensor:
        """``[n_items, d]``: computed once per evaluation pass (cached while not training)."""
        if self.training:
            return self.compute_item_table()
        key = self._table_key()
        if self._item_table is None or self._item_table_key != key:
            with torch.no_grad():
                self._item_table = self.compute_item_table()
            self._item_table_key = key
        return self._item_table

    def invalidate_item_table(self) -> None:
        self._item_table = None
        self._item_table_key = None

    def train(self, mode: bool = True):
        self.invalidate_item_table()
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self.invalidate_item_table()
        return super().load_state_dict(*args, **kwargs)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.embed_ids(ids)
        return self.item_table()[ids]

    # ------------------------------------------------------------------ user side
    def encode_sequence(self, seq_emb: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        """User-encoder output at every position, ``[B, L, d]`` (fp32)."""
        position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
        position_embedding = self.position_embedding(position_ids).unsqueeze(0)
        with self._autocast():
            x = self.dropout(self.LayerNorm(seq_emb + position_embedding))
            mask = self.get_attention_mask(item_seq)
            out = self.trm_encoder(x, mask, output_all_encoded_layers=True)[-1]
        return out.float()

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        out = self.encode_sequence(self._lookup(item_seq), item_seq)
        return self.gather_indexes(out, item_seq_len - 1)  # [B, d]

    # ------------------------------------------------------------------ RecBole API
    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        B, L = item_seq.shape
        slots = build_slots(item_seq, item_seq_len, pos_items)
        if self.loss_type == "CE":
            table = self.compute_item_table()
            out = self.encode_sequence(table[item_seq], item_seq)
            query = out if self.loss_positions == "all" else self.gather_indexes(out, item_seq_len - 1)
            return full_softmax_loss(query, table, slots, item_seq_len, self.loss_positions)
        # towers once per distinct item of the batch (sequence ids and targets)
        ids = torch.cat([item_seq.reshape(-1), slots.reshape(-1)])
        emb = self.embed_ids(ids)
        seq_emb = emb[: B * L].view(B, L, -1)
        slot_emb = emb[B * L:].view(B, L + 1, -1)
        out = self.encode_sequence(seq_emb, item_seq)
        query = out if self.loss_positions == "all" else self.gather_indexes(out, item_seq_len - 1)
        return inbatch_softmax_loss(query, slot_emb, slots, item_seq_len, self.log_pop, self.loss_positions)

    def predict(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        test_item = interaction[self.ITEM_ID]
        seq_output = self.forward(item_seq, item_seq_len)
        test_item_emb = self._lookup(test_item)
        return (seq_output * test_item_emb).sum(dim=-1)

    def full_sort_predict(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        table = self.item_table()
        seq_output = self.encode_sequence(table[item_seq], item_seq)
        seq_output = self.gather_indexes(seq_output, item_seq_len - 1)
        scores = seq_output @ table.t()  # [B, n_items]
        if self.paper_protocol:
            # the paper masks the user's history at ranking (pads hit column 0, which RecBole masks)
            scores = scores.scatter(1, item_seq, float("-inf"))
        return scores

    # ------------------------------------------------------------------ optimiser, reporting
    def param_groups(self) -> list[dict]:
        """The authors' five optimiser groups (iisan-method.md 4.3); tower A plays "text",
        tower B "image". Empty groups are left out."""

        def params(*modules):
            out = []
            for m in modules:
                if m is None:
                    continue
                if isinstance(m, nn.Parameter):
                    out.append(m)
                else:
                    out.extend(m.parameters())
            return [p for p in out if p.requires_grad]

        def gates(tower):
            return tower.gates if tower is not None and tower.gates is not None else None

        inter = self.inter
        groups = {
            "recsys": params(
                *self.user_encoder_modules(), self.fusion,
                self.head_a.second if self.head_a is not None else None,
                self.head_b.second if self.head_b is not None else None,
                self.head_inter, gates(self.intra_a), gates(inter),
                inter.dtls if inter is not None else None,
            ),
            "text_sanb": params(self.intra_a.blocks if self.intra_a is not None else None),
            "image_sanb": params(
                self.intra_b.blocks if self.intra_b is not None else None,
                inter.blocks if inter is not None else None,
            ),
            "image_head": params(self.head_b.first if self.head_b is not None else None, gates(self.intra_b)),
            "text_head": params(self.head_a.first if self.head_a is not None else None),
        }
        return [
            {"params": ps, "lr": self.iisan_lr[name], "name": name}
            for name, ps in groups.items() if ps
        ]

    def gate_values(self) -> dict[str, list[float]]:
        """Current gate values: intra gates per tower (weight on the backbone row) and inter gates
        (weight on tower B's row); empty lists where a tower or its gates are absent."""
        return {
            self.tower_a: self.intra_a.gate_values() if self.intra_a is not None else [],
            self.tower_b: self.intra_b.gate_values() if self.intra_b is not None else [],
            "inter": self.inter.gate_values() if self.inter is not None else [],
        }


class IISANVS(IISANBase):
    """IISAN (symmetric): two towers of equal width and depth; heads ``D -> D -> d``."""

    default_head_type = "symmetric"

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

    default_head_type = "asymmetric"
