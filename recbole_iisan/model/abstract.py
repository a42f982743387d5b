"""The abstract side-network recommender every plugin model is.

A :class:`SideNetworkRecommender` is a RecBole ``SequentialRecommender`` made of two parts:

- an *item side* (subclasses): ``item_embeddings(ids [M]) -> [M, d]``, an item's embedding from
  its content (IISAN: side networks over frozen hidden states; the end-to-end baselines: trainable
  backbones with a linear head);
- what every method shares (here): the SASRec-style user encoder (RecBole's post-LN
  ``TransformerEncoder`` with learned positions), the training loss (the paper's in-batch softmax
  with log-popularity correction, or the full softmax ``CE``), the item table computed once per
  evaluation pass, the optimiser's parameter groups, and parameter counts.

During training the item side runs once per distinct item id of a batch (``embed_ids``).
Defaults of every key live in ``properties/IISAN.yaml`` (shared) and the per-model yaml deltas.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.model.loss import (LOSS_POSITIONS, LOSS_TYPES, build_slots, full_softmax_loss,
                                      inbatch_softmax_loss, popularity_log_prob)
from recbole_iisan.model.user_encoder import USER_ENCODER_INITS, USER_ENCODERS, build_transformer
from recbole_iisan.utils.resources import trainable_parameters

MIXED_PRECISION = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise PluginConfigError(f"config key '{key}': expected one of {list(allowed)}, got {value!r}")


class SideNetworkRecommender(SequentialRecommender):
    """User encoder, loss, item table and optimiser groups shared by every plugin model.

    Subclasses implement ``_build_item_side(config, dataset)`` (called before the user encoder is
    built, so parameter creation order is item side first) and ``item_embeddings(ids)``; they may
    extend ``param_groups``, ``parameter_counts``, ``gate_values`` and ``_state_key``.
    """

    input_type = InputType.POINTWISE
    #: yaml files (without .yaml, lowest priority first) holding this model's defaults
    properties: tuple[str, ...] = ("IISAN",)
    #: what the dataset must serve: "states" (cached hidden states) or "raw" (raw item inputs)
    item_inputs = "states"

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.logger = logging.getLogger()
        self.embedding_size = int(config["embedding_size"])
        self.hidden_size = self.embedding_size
        self.loss_type = str(config["loss_type"])
        self.loss_positions = str(config["loss_positions"])  # resolved from 'auto' by config.resolve_protocol
        self.mixed_precision = str(config["mixed_precision"]).lower()
        self.tower_batch_size = int(config["tower_batch_size"])
        self.run_pads = bool(config["run_pads"])
        self.learning_rate = float(config["learning_rate"])
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("loss_positions", self.loss_positions, LOSS_POSITIONS)
        check_choice("mixed_precision", self.mixed_precision, tuple(MIXED_PRECISION))

        self._build_item_side(config, dataset)
        self._build_user_encoder(config)
        # popularity correction of the in-batch loss: from the training targets (RecBole's
        # augmented prefixes), or, one window per user (paper protocol), from every item of the
        # train sequences s[0:L-2] (the authors' code, github.com/GAIR-Lab/IISAN)
        targets = dataset.inter_feat[self.ITEM_ID]
        targets = torch.as_tensor(targets.numpy() if hasattr(targets, "numpy") else targets)
        if getattr(dataset, "one_window_per_user", False):
            seqs = torch.as_tensor(dataset.inter_feat[self.ITEM_SEQ])
            targets = torch.cat([targets.reshape(-1), seqs[seqs > 0]])
        self.register_buffer("log_pop", popularity_log_prob(targets, self.n_items), persistent=False)
        self._item_table: Optional[torch.Tensor] = None
        self._item_table_key = None
        if self.mixed_precision == "fp16" and not config["enable_scaler"]:
            self.logger.warning("mixed_precision: fp16 without RecBole's GradScaler (enable_scaler: True) may "
                                "underflow gradients; bf16 needs no scaler")
        counts = self.parameter_counts()
        self.logger.info(f"{type(self).__name__} trainable parameters: "
                         + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + self._describe_item_side())

    # ------------------------------------------------------------------ item side (subclasses)
    def _build_item_side(self, config, dataset) -> None:
        raise NotImplementedError

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """``[M]`` item ids -> ``[M, d]`` fp32 item embeddings, one row per id."""
        raise NotImplementedError

    def _describe_item_side(self) -> str:
        return ""

    def _state_key(self) -> tuple:
        """What besides the parameters the item table depends on (e.g. the cached states' storage)."""
        return ()

    # ------------------------------------------------------------------ user encoder
    def _build_user_encoder(self, config) -> None:
        """The user encoder: learned positions, a transformer (:func:`.user_encoder.build_transformer`:
        the authors' or RecBole's SASRec blocks, ``user_encoder``), input LayerNorm and dropout,
        initialised as the chosen encoder is (the authors': Xavier-normal; RecBole's: normal)."""
        self.user_encoder = str(config["user_encoder"])  # resolved from ~ by config.resolve_protocol
        check_choice("user_encoder", self.user_encoder, USER_ENCODERS)
        self.user_encoder_init = "xavier" if self.user_encoder == "authors" else str(config["user_encoder_init"])
        check_choice("user_encoder_init", self.user_encoder_init, USER_ENCODER_INITS)
        self.initializer_range = float(config["initializer_range"])
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.trm_encoder = build_transformer(self.user_encoder, config, self.hidden_size)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=float(config["layer_norm_eps"]))
        self.dropout = nn.Dropout(float(config["hidden_dropout_prob"]))
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

    def _device(self) -> torch.device:
        return self.log_pop.device if hasattr(self, "log_pop") else next(self.parameters()).device

    def _autocast(self):
        dtype = MIXED_PRECISION[self.mixed_precision]
        # evaluation always runs in fp32, as the authors' code does
        if dtype is None or self._device().type != "cuda" or not self.training:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def encode_sequence(self, seq_emb: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        """User-encoder output at every position, ``[B, L, d]`` (fp32), in RecBole's left-aligned
        layout: ``out[b, j]`` is the output at the sequence's j-th item."""
        if self.user_encoder == "authors":
            return self._encode_authors(seq_emb, item_seq)
        position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
        position_embedding = self.position_embedding(position_ids).unsqueeze(0)
        with self._autocast():
            x = self.dropout(self.LayerNorm(seq_emb + position_embedding))
            mask = self.get_attention_mask(item_seq)
            out = self.trm_encoder(x, mask, output_all_encoded_layers=True)[-1]
        return out.float()

    def _encode_authors(self, seq_emb: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        """The authors' encoder: the sequence is re-padded to the right end (the most recent item at
        position L-1, absolute positions), encoded, and the outputs moved back to the left-aligned
        layout (pad positions get zeros)."""
        B, L = item_seq.shape
        x, real, shift, lens = self._right_aligned_input(seq_emb, item_seq)
        with self._autocast():
            out = self.trm_encoder(x, real).float()
        ar = torch.arange(L, device=item_seq.device)[None, :]
        back = (ar + shift).clamp_max(L - 1)  # left-aligned j <- right-aligned j + shift
        left = out.gather(1, back[..., None].expand(-1, -1, out.size(-1)))
        return left * (ar < lens[:, None])[..., None].to(left.dtype)

    def _right_aligned_input(self, seq_emb: torch.Tensor, item_seq: torch.Tensor) -> tuple:
        """``(x [B, L, d], real [B, L], shift [B, 1], lens [B])``: the authors' encoder input (position
        embeddings, LayerNorm, dropout) of the sequences re-padded to the right end."""
        L = item_seq.size(1)
        lens = (item_seq > 0).sum(dim=1)
        shift = (L - lens)[:, None]  # left pads of the right-aligned layout
        ar = torch.arange(L, device=item_seq.device)[None, :]
        src = ar - shift  # right-aligned position p holds left-aligned item p - shift
        real = src >= 0
        right = seq_emb.gather(1, src.clamp_min(0)[..., None].expand(-1, -1, seq_emb.size(-1)))
        right = right * real[..., None].to(right.dtype)
        with self._autocast():
            x = self.dropout(self.LayerNorm(right + self.position_embedding(ar)))
        return x, real, shift, lens

    def encode_last(self, seq_emb: torch.Tensor, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """The user-encoder output at each sequence's last item, ``[B, d]`` (fp32): the query of
        :meth:`forward` and the scores. In evaluation the authors' encoder computes only that position
        in its last block (keys and values still read every position: the same values); in training,
        and with RecBole's encoder, every position is computed and the last one gathered."""
        if self.user_encoder != "authors" or self.training:
            return self.gather_indexes(self.encode_sequence(seq_emb, item_seq), item_seq_len - 1)
        x, real, _, _ = self._right_aligned_input(seq_emb, item_seq)
        with self._autocast():
            return self.trm_encoder(x, real, last_only=True)[:, -1].float()

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        return self.encode_last(self._lookup(item_seq), item_seq, item_seq_len)  # [B, d]

    # ------------------------------------------------------------------ items
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Item embeddings for an id tensor of any shape; the item side runs once per distinct id."""
        uniq, inverse = torch.unique(ids, return_inverse=True)
        return self.item_embeddings(uniq)[inverse]

    def compute_item_table(self) -> torch.Tensor:
        """Every item's embedding, ``[n_items, d]``, in chunks of ``tower_batch_size`` items."""
        all_ids = torch.arange(self.n_items, device=self._device())
        return torch.cat([self.item_embeddings(c) for c in all_ids.split(self.tower_batch_size)], dim=0)

    def _table_key(self) -> tuple:
        # parameters are changed in place by optimisers and load_state_dict (version counter) or
        # replaced by .to() (data pointer); any change makes a new key
        return tuple((p.data_ptr(), p._version) for p in self.parameters()) + self._state_key()

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
        # entering training frees the table; eval() keeps it: the key tells whether it is still valid,
        # so a validation pass and the test pass after it share one table when nothing changed
        if mode:
            self.invalidate_item_table()
        return super().train(mode)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """RecBole's; the item table survives loading the very parameters the model already holds (the
        best epoch is the last one validated), and is dropped otherwise."""
        same = self._item_table is not None and self._holds(state_dict)
        out = super().load_state_dict(state_dict, *args, **kwargs)
        if same:
            self._item_table_key = self._table_key()
        else:
            self.invalidate_item_table()
        return out

    def _holds(self, state_dict) -> bool:
        own = self.state_dict()
        return own.keys() == state_dict.keys() and all(
            torch.equal(own[k], v.to(own[k].device)) for k, v in state_dict.items() if torch.is_tensor(v))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.embed_ids(ids)
        return self.item_table()[ids]

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
        if self.run_pads:
            # the authors' way: every one of the B * (L + 1) slots, pads included, through the item side.
            # Position len holds the target instead of a pad: masked as a key (item_seq is 0 there)
            # and causally invisible to the real positions, so the outputs that count are unchanged.
            slot_emb = self.item_embeddings(slots.reshape(-1)).view(B, L + 1, -1)
            seq_emb = slot_emb[:, :L]
        else:
            # the item side once per distinct item of the batch (sequence ids and targets)
            emb = self.embed_ids(torch.cat([item_seq.reshape(-1), slots.reshape(-1)]))
            seq_emb = emb[: B * L].view(B, L, -1)
            slot_emb = emb[B * L:].view(B, L + 1, -1)
        out = self.encode_sequence(seq_emb, item_seq)
        query = out if self.loss_positions == "all" else self.gather_indexes(out, item_seq_len - 1)
        return inbatch_softmax_loss(query, slot_emb, slots, item_seq_len, self.log_pop, self.loss_positions)

    def predict(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        seq_output = self.forward(item_seq, item_seq_len)
        test_item_emb = self._lookup(interaction[self.ITEM_ID])
        return (seq_output * test_item_emb).sum(dim=-1)

    def full_sort_predict(self, interaction):
        """Scores of every item, ``[B, n_items]``. History masking is the trainer's (one place)."""
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        table = self.item_table()
        seq_output = self.encode_last(table[item_seq], item_seq, item_seq_len)
        return seq_output @ table.t()

    # ------------------------------------------------------------------ optimiser, reporting
    def item_side_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        """``(name, parameters, lr)`` of the item side's optimiser groups other than ``recsys``."""
        return []

    def recsys_parameters(self) -> list[nn.Parameter]:
        """The ``recsys`` group: the user encoder plus the item-side parameters no other group takes."""
        taken = {id(p) for _, ps, _ in self.item_side_groups() for p in ps}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in taken]

    def recsys_lr(self) -> float:
        return self.learning_rate

    def param_groups(self) -> list[dict]:
        """Optimiser groups with their learning rates; empty groups are left out. The trainer
        passes them to RecBole's ``_build_optimizer(params=...)``."""
        groups = [("recsys", self.recsys_parameters(), self.recsys_lr())] + self.item_side_groups()
        return [{"params": ps, "lr": lr, "name": name} for name, ps, lr in groups if ps]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part."""
        counts = dict(self.item_side_counts())
        counts["user encoder"] = trainable_parameters(*self.user_encoder_modules())
        counts["total"] = trainable_parameters(self)
        return counts

    def item_side_counts(self) -> dict[str, int]:
        return {}

    def gate_values(self) -> dict[str, list[float]]:
        return {}
