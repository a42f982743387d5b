"""The paper's end-to-end baselines (iisan-method.md section 6) as RecBole models.

Every model here is an :class:`~recbole_iisan.model.iisan.IISANBase`: the SASRec-style user
encoder, the in-batch debiased loss, the data and the evaluation are IISAN's, one code path. Only
the item side differs: the backbones run INSIDE the training step on the raw item inputs of
:class:`~recbole_iisan.data.raw_inputs.RawInputSequentialDataset` (``needs_raw_inputs``).

- :class:`IISANUncached`: IISAN's side network on the selected hidden states of the frozen
  backbones, computed in every step (backbones in eval mode, under ``torch.no_grad``). Same
  LayerDrop rows (``layer_select.tower_layers_from_config``) and pooling as the cache.
- :class:`FFT`: full fine-tuning; ``modality=intra`` item tower of 6.1:
  ``e = Linear(2d->d)([GELU(Linear(D_B->d)(pool_B)), GELU(Linear(D_A->d)(pool_A))])`` on the
  LAST hidden state (``last_hidden_state``: post-final-LayerNorm for ViT / DINOv2, as the
  authors' ViT classifier input; BERT's last layer output).
- :class:`Adapter`: Houlsby (serial) adapters, 2 per backbone layer, each the 3.1 block
  (ReLU bottleneck r = ``adapter_size``, residual inside, N(0, 0.01^2) init); backbones frozen,
  LayerNorms frozen. peft 0.21 has no bottleneck-adapter method, so adapters are inserted by
  module replacement (see :func:`insert_houlsby_adapters`).
- :class:`LoRA`: ``peft`` LoRA on the query / value projections of every attention layer,
  pretrained weights KEPT (the authors' loralib code replaced them by random ones, 6.2).
- :class:`BitFit`: only the backbones' bias parameters train.

Towers run once per distinct item of a batch (inherited ``embed_ids``); ``run_pads: True`` runs
all ``B * (L + 1)`` slots, pads included, through the backbones, as the authors did. The
evaluation table (``item_table``) encodes every item once per evaluation pass, in chunks of
``tower_batch_size`` items. BERT-style poolers are dropped (unused; the authors' FFT freezes it).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

import torch
from torch import nn
import torch.nn.functional as F

from recbole_iisan.model.iisan import IISANBase, MIXED_PRECISION, _get, _n_params
from recbole_iisan.model.layers import SANB
from recbole_iisan.model.loss import build_slots, inbatch_softmax_loss

logger = logging.getLogger()

BASELINE_LR_GROUPS = ("text_backbone", "image_backbone", "peft")
DEFAULT_BASELINE_LR = {"text_backbone": 5e-5, "image_backbone": 1e-4, "peft": 4e-4}
LORA_TARGETS = ("query", "value", "q_proj", "v_proj")


# ------------------------------------------------------------------------------------------------
# backbones

def load_backbone(encoder: str) -> tuple[nn.Module, Any]:
    """A Hugging Face backbone (``AutoModel``, fp32) and its encoder info; poolers removed."""
    from transformers import AutoModel

    from recbole_iisan.data.encoders import encoder_info, resolve_encoder

    path, kwargs = resolve_encoder(encoder)
    model = AutoModel.from_pretrained(path, dtype=torch.float32, **kwargs)
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None  # unused (CLS / mean pooling of hidden states); BertModel / ViTModel skip it
    return model, encoder_info(encoder)


def pool(h: torch.Tensor, mask: Optional[torch.Tensor], pooling: str) -> torch.Tensor:
    """``[M, T, D] -> [M, D]`` as the cache pools (``encoders.FrozenEncoder._pool``)."""
    if pooling == "cls":
        return h[:, 0]
    if pooling == "mean_unmasked" or mask is None:
        return h.float().mean(dim=1)
    m = mask.to(torch.float32).unsqueeze(-1)
    if pooling == "mean":
        return (h.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    if pooling == "last":
        last = mask.sum(dim=1).clamp_min(1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ValueError(f"unknown pooling {pooling!r}")


class _AfterAdapter(nn.Module):
    """``adapter(module(x))``: a module followed by a Houlsby adapter (the 3.1 block)."""

    def __init__(self, module: nn.Module, adapter: nn.Module):
        super().__init__()
        self.module = module
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.module(x))


def insert_houlsby_adapters(model: nn.Module, bottleneck: int = 64, activation: str = "relu") -> list[nn.Module]:
    """Insert 2 serial adapters per transformer layer, by module replacement; returns them.

    - BERT-style layers (``attention.output`` / ``output`` with ``dense`` -> ``dropout`` ->
      ``LayerNorm(x + residual)``): the adapter goes after the dropout, before the residual
      LayerNorm (exactly the authors' placement).
    - ViT / DINOv2 (transformers 5: ``attention.o_proj``, ``mlp.fc2``): after the output
      projection, before the layer's dropout / layer scale and residual (ViT-base and DINOv2
      have dropout 0, so this equals "after dropout").
    """
    adapters: list[nn.Module] = []
    width = int(model.config.hidden_size)

    def wrap(parent: nn.Module, attr: str) -> None:
        adapter = SANB(width, bottleneck, activation)
        setattr(parent, attr, _AfterAdapter(getattr(parent, attr), adapter))
        adapters.append(adapter)

    targets: list[tuple[nn.Module, str]] = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls.endswith("SelfOutput") or (cls.endswith("Output") and hasattr(mod, "dense") and hasattr(mod, "LayerNorm")):
            if isinstance(getattr(mod, "dropout", None), nn.Dropout):
                targets.append((mod, "dropout"))
        elif cls.endswith("Attention") and isinstance(getattr(mod, "o_proj", None), nn.Linear):
            targets.append((mod, "o_proj"))
        elif cls.endswith("MLP") and isinstance(getattr(mod, "fc2", None), nn.Linear):
            targets.append((mod, "fc2"))
    for parent, attr in targets:
        wrap(parent, attr)
    n_layers = int(getattr(model.config, "num_hidden_layers", 0))
    if len(adapters) != 2 * n_layers:
        raise ValueError(
            f"Houlsby adapters: found {len(adapters)} insertion points in a {type(model).__name__} "
            f"with {n_layers} layers (expected {2 * n_layers}); this architecture is not supported"
        )
    return adapters


# ------------------------------------------------------------------------------------------------
# the shared end-to-end model

class BackboneRecommender(IISANBase):
    """IISANBase with the backbones in the loop: the item side reads raw inputs, not caches.

    Subclasses build the item tower (``_build_side_network``) and set which backbone parameters
    train (``_adapt_backbones``).
    """

    needs_raw_inputs = True
    needs_item_states = False
    backbones_always_eval = False  # IISANUncached: frozen backbones stay in eval mode

    # ------------------------------------------------------------------ set-up
    def _read_config(self, config) -> None:
        super()._read_config(config)
        self._config = config
        self.run_pads = bool(_get(config, "run_pads", False))
        lrs = dict(DEFAULT_BASELINE_LR)
        for k, v in dict(_get(config, "backbone_lr", {}) or {}).items():
            if k not in BASELINE_LR_GROUPS:
                raise ValueError(f"backbone_lr: unknown group {k!r}; the groups are {BASELINE_LR_GROUPS}")
            lrs[k] = v
        self.backbone_lr = {k: float(v) for k, v in lrs.items()}

    def _attach_states(self, dataset) -> None:
        from recbole_iisan.data.encoders import resolve_pooling

        towers = self._take_towers(dataset, ("towers", "item_inputs", "tower_specs"), "raw item inputs",
                                   "recbole_iisan.data.raw_inputs.RawInputSequentialDataset")
        self.specs = {t: dataset.tower_specs[t] for t in towers}
        backbones, infos = {}, {}
        for t in towers:
            backbones[t], infos[t] = load_backbone(self.specs[t].encoder)
        self.backbones = nn.ModuleDict(backbones)
        self.is_image = {t: bool(self.specs[t].is_image) for t in towers}
        self.pooling = {t: resolve_pooling(self.specs[t].pooling, infos[t].is_decoder, self.is_image[t]) for t in towers}
        self.is_decoder = {t: bool(infos[t].is_decoder) for t in towers}
        self.encoder_depths = {t: int(infos[t].n_layers) for t in towers}
        self.dim_a, self.dim_b = int(infos[self.tower_a].dim), int(infos[self.tower_b].dim)
        self.state_layers = {t: [self.encoder_depths[t]] for t in towers}  # the last hidden state
        self.n_rows_a = self.n_rows_b = 1
        self._input_keys: dict[str, list[str]] = {}
        for t in towers:
            inputs = dataset.item_inputs[t]
            for key, value in inputs.items():
                if key in ("input_ids", "attention_mask", "pixels") and value.size(0) != self.n_items:
                    raise ValueError(f"tower '{t}': {key} has {value.size(0)} rows, expected n_items={self.n_items}")
                self.register_buffer(f"_in_{t}_{key}", value, persistent=False)
            self._input_keys[t] = list(inputs)
        self._adapt_backbones()

    def _adapt_backbones(self) -> None:
        """Which backbone parameters train (default: none)."""
        self.backbones.requires_grad_(False)

    # ------------------------------------------------------------------ inputs and backbones
    def _dev(self) -> torch.device:
        return next(self.parameters()).device

    def _autocast(self):
        dtype = MIXED_PRECISION[self.mixed_precision]
        if dtype is None or self._dev().type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def tower_inputs(self, tower: str, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """The backbone's keyword inputs for item ids ``[M]`` and the token mask (text)."""
        if self.is_image[tower]:
            pix = getattr(self, f"_in_{tower}_pixels")[ids]
            mean = getattr(self, f"_in_{tower}_mean").view(1, -1, 1, 1)
            std = getattr(self, f"_in_{tower}_std").view(1, -1, 1, 1)
            rescale = getattr(self, f"_in_{tower}_rescale")
            x = (pix.float() * rescale - mean) / std
            return {"pixel_values": x}, None
        input_ids = getattr(self, f"_in_{tower}_input_ids")[ids]
        mask = getattr(self, f"_in_{tower}_attention_mask")[ids]
        width = int(mask.sum(dim=1).max().item()) if mask.numel() else 1
        if self.pooling[tower] != "mean_unmasked":
            input_ids, mask = input_ids[:, :width], mask[:, :width]  # right padding: no effect on real tokens
        kwargs = {"input_ids": input_ids}
        if self.pooling[tower] != "mean_unmasked":
            kwargs["attention_mask"] = mask
        return kwargs, mask

    def run_backbone(self, tower: str, ids: torch.Tensor, hidden_states: bool = False):
        """``(output, mask)`` of tower's backbone on items ``ids``."""
        kwargs, mask = self.tower_inputs(tower, ids)
        if self.is_decoder[tower]:
            kwargs["use_cache"] = False
        with self._autocast():
            out = self.backbones[tower](**kwargs, output_hidden_states=hidden_states, return_dict=True)
        return out, mask

    def last_pooled(self, tower: str, ids: torch.Tensor) -> torch.Tensor:
        """Pooled last hidden state ``[M, D]`` (fp32)."""
        out, mask = self.run_backbone(tower, ids)
        return pool(out.last_hidden_state, mask, self.pooling[tower]).float()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbones_always_eval and hasattr(self, "backbones"):
            self.backbones.eval()
        return self

    # ------------------------------------------------------------------ items
    def compute_item_table(self) -> torch.Tensor:
        all_ids = torch.arange(self.n_items, device=self._dev())
        return torch.cat([self.item_embeddings(c) for c in all_ids.split(self.tower_batch_size)], dim=0)

    def _table_key(self):
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def calculate_loss(self, interaction):
        if not (self.run_pads and self.loss_type == "inbatch"):
            return super().calculate_loss(interaction)
        # the authors' way: every one of the B * (L + 1) slots, pads included, through the towers
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        B, L = item_seq.shape
        slots = build_slots(item_seq, item_seq_len, pos_items)
        slot_emb = self.item_embeddings(slots.reshape(-1)).view(B, L + 1, -1)
        # position len holds the target instead of a pad: masked as a key (item_seq is 0 there)
        # and causally invisible to the real positions, so the outputs that count are unchanged
        out = self.encode_sequence(slot_emb[:, :L], item_seq)
        query = out if self.loss_positions == "all" else self.gather_indexes(out, item_seq_len - 1)
        return inbatch_softmax_loss(query, slot_emb, slots, item_seq_len, self.log_pop, self.loss_positions)

    def gate_values(self) -> dict[str, list[float]]:
        return {
            self.tower_a: self.intra_a.gate_values() if getattr(self, "intra_a", None) is not None else [],
            self.tower_b: self.intra_b.gate_values() if getattr(self, "intra_b", None) is not None else [],
            "inter": self.inter.gate_values() if getattr(self, "inter", None) is not None else [],
        }


# ------------------------------------------------------------------------------------------------
# IISAN with the frozen backbones in the loop

class IISANUncached(BackboneRecommender):
    """IISAN's side network on hidden states computed by the frozen backbones in every step.

    With the same side-network weights its item embeddings equal the cached IISAN's up to the
    cache's storage precision (``cache_dtype``, fp16 by default).
    """

    backbones_always_eval = True

    def _attach_states(self, dataset) -> None:
        from recbole_iisan.model.layer_select import tower_layers_from_config

        super()._attach_states(dataset)
        self.state_layers = {t: list(v) for t, v in tower_layers_from_config(self._config, self.encoder_depths).items()}
        self.n_rows_a = len(self.state_layers[self.tower_a])
        self.n_rows_b = len(self.state_layers[self.tower_b])
        self._validate_towers()
        self.backbones.eval()

    def hidden_rows(self, tower: str, ids: torch.Tensor) -> torch.Tensor:
        """``[M, n_rows, D]`` pooled selected hidden states (what the cache stores), fp32."""
        with torch.no_grad():
            out, mask = self.run_backbone(tower, ids, hidden_states=True)
            hs = out.hidden_states
            rows = [pool(hs[i], mask, self.pooling[tower]) for i in self.state_layers[tower]]
            return torch.stack(rows, dim=1).float()

    def side_network(self, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
        """IISANBase.item_embeddings' tower part on given states (the same modules)."""
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

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.side_network(self.hidden_rows(self.tower_a, ids), self.hidden_rows(self.tower_b, ids))


# ------------------------------------------------------------------------------------------------
# the "intra" item tower of the end-to-end baselines (6.1)

class IntraBaseline(BackboneRecommender):
    """``e = Linear(2d->d)([GELU(Linear(D_B->d)(pool_B)), GELU(Linear(D_A->d)(pool_A))])``."""

    def _build_side_network(self) -> None:
        d = self.embedding_size
        self.intra_a = self.intra_b = self.inter = None
        self.head_a = self.head_b = self.head_inter = None
        self.proj_a = nn.Linear(self.dim_a, d)
        self.proj_b = nn.Linear(self.dim_b, d)
        if self.is_image[self.tower_b]:
            # the authors' ViT classifier: Xavier-normal, zero bias
            nn.init.xavier_normal_(self.proj_b.weight)
            nn.init.zeros_(self.proj_b.bias)
        self.fusion = nn.Linear(2 * d, d)

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        h_a = self.last_pooled(self.tower_a, ids)
        h_b = self.last_pooled(self.tower_b, ids)
        with self._autocast():
            e = self.fusion(torch.cat([F.gelu(self.proj_b(h_b)), F.gelu(self.proj_a(h_a))], dim=-1))
        return e.float()

    # ------------------------------------------------------------------ reporting, optimiser
    def peft_parameters(self) -> list[nn.Parameter]:
        """Parameters added inside the backbones (adapters, LoRA A/B)."""
        return []

    def _backbone_params(self, tower: str) -> list[nn.Parameter]:
        extra = {id(p) for p in self.peft_parameters()}
        return [p for p in self.backbones[tower].parameters() if p.requires_grad and id(p) not in extra]

    def parameter_counts(self) -> dict[str, int]:
        counts = {
            f"{self.tower_a} backbone": sum(p.numel() for p in self._backbone_params(self.tower_a)),
            f"{self.tower_b} backbone": sum(p.numel() for p in self._backbone_params(self.tower_b)),
            "adapters": sum(p.numel() for p in self.peft_parameters() if p.requires_grad),
            "heads": _n_params(self.proj_a) + _n_params(self.proj_b),
            "fusion": _n_params(self.fusion),
            "user encoder": sum(_n_params(m) for m in self.user_encoder_modules()),
        }
        counts["total"] = _n_params(self)
        return counts

    def param_groups(self) -> list[dict]:
        """Groups: ``recsys`` (user encoder, projections, fusion; ``learning_rate``),
        ``text_backbone`` / ``image_backbone`` (trainable backbone parameters of tower A / B) and
        ``peft`` (adapters / LoRA), lrs from ``backbone_lr``. Empty groups are left out."""
        peft = [p for p in self.peft_parameters() if p.requires_grad]
        recsys = [p for m in self.user_encoder_modules() + [self.proj_a, self.proj_b, self.fusion]
                  for p in m.parameters() if p.requires_grad]
        groups = [
            ("recsys", recsys, self.iisan_lr["recsys"]),
            ("text_backbone", self._backbone_params(self.tower_a), self.backbone_lr["text_backbone"]),
            ("image_backbone", self._backbone_params(self.tower_b), self.backbone_lr["image_backbone"]),
            ("peft", peft, self.backbone_lr["peft"]),
        ]
        return [{"params": ps, "lr": lr, "name": name} for name, ps, lr in groups if ps]


class FFT(IntraBaseline):
    """Full fine-tuning: every backbone parameter trains (backbones in train mode)."""

    def _adapt_backbones(self) -> None:
        self.backbones.requires_grad_(True)


class Adapter(IntraBaseline):
    """Houlsby adapters (2 per layer, r = ``adapter_size``) in frozen backbones."""

    def _adapt_backbones(self) -> None:
        self.backbones.requires_grad_(False)
        size = int(_get(self._config, "adapter_size", 64))
        act = str(_get(self._config, "adapter_activation", "relu"))
        adapters = []
        for t in self.towers:
            adapters += insert_houlsby_adapters(self.backbones[t], size, act)
        for a in adapters:
            a.requires_grad_(True)
        self._adapters = adapters  # a plain list: the modules are registered inside the backbones

    def peft_parameters(self) -> list[nn.Parameter]:
        return [p for a in self._adapters for p in a.parameters()]


class LoRA(IntraBaseline):
    """peft LoRA (r = ``lora_r``, alpha = ``lora_alpha``) on every query / value projection of both
    backbones; the pretrained weights are kept and frozen, only ``lora_A`` / ``lora_B`` train."""

    def _adapt_backbones(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.backbones.requires_grad_(False)
        r = int(_get(self._config, "lora_r", 8))
        alpha = float(_get(self._config, "lora_alpha", 8))
        dropout = float(_get(self._config, "lora_dropout", 0.0))
        for t in self.towers:
            names = {n.split(".")[-1] for n, m in self.backbones[t].named_modules() if isinstance(m, nn.Linear)}
            targets = [n for n in LORA_TARGETS if n in names]
            if not targets:
                raise ValueError(f"LoRA: backbone of tower '{t}' has no query/value Linears ({LORA_TARGETS})")
            cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
            self.backbones[t] = inject_adapter_in_model(cfg, self.backbones[t])
        for n, p in self.backbones.named_parameters():
            p.requires_grad_("lora_" in n)

    def peft_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.backbones.named_parameters() if "lora_" in n]


class BitFit(IntraBaseline):
    """Only the backbones' bias parameters (Linear, conv, LayerNorm) train."""

    def _adapt_backbones(self) -> None:
        for n, p in self.backbones.named_parameters():
            p.requires_grad_(n.endswith("bias"))
