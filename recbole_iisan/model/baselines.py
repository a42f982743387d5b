"""The paper's end-to-end baselines as RecBole models: FFT, Adapter, LoRA and BitFit.

Each is a :class:`~recbole_iisan.model.abstract.SideNetworkRecommender` (the user encoder, loss,
data and evaluation are IISAN's) whose item side is the baselines' ``modality=intra`` tower on
trainable or adapted backbones running in the step on the items' raw inputs
(:class:`~recbole_iisan.model.states.Backbones`):

    e = Linear(2d -> d)([GELU(Linear(D_B -> d)(pool_B)), GELU(Linear(D_A -> d)(pool_A))])

on the pooled LAST hidden state (post-final-LayerNorm for ViT / DINOv2, as the authors' ViT
classifier input; BERT's last layer output).

- :class:`FFT`: full fine-tuning, every backbone parameter trains.
- :class:`Adapter`: Houlsby adapters (2 per layer, ``adapter_size``) in frozen backbones.
- :class:`LoRA`: peft LoRA on the query / value projections; the pretrained weights are kept and
  frozen (the authors' loralib code replaced them by random ones).
- :class:`BitFit`: only the backbones' bias parameters train.

IISAN with the frozen backbones in the loop is :class:`~recbole_iisan.model.iisan.IISANUncached`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.model.abstract import MIXED_PRECISION, SideNetworkRecommender
from recbole_iisan.utils.resources import trainable_parameters
from recbole_iisan.model.adapters import insert_houlsby_adapters
from recbole_iisan.model.states import Backbones

BACKBONE_LR_GROUPS = ("text_backbone", "image_backbone", "peft")
LORA_TARGETS = ("query", "value", "q_proj", "v_proj")


class IntraBaseline(SideNetworkRecommender):
    """Backbones in the loop + the ``intra`` item tower; subclasses choose what trains
    (``_adapt_backbones``) and may add parameters inside the backbones (``peft_parameters``)."""

    properties = ("IISAN", "Baseline")
    item_inputs = "raw"

    def _build_item_side(self, config, dataset) -> None:
        lrs = dict(config["backbone_lr"] or {})
        unknown = sorted(set(lrs) - set(BACKBONE_LR_GROUPS))
        missing = sorted(set(BACKBONE_LR_GROUPS) - set(lrs))
        if unknown or missing:
            raise PluginConfigError(f"config key 'backbone_lr': expected the groups {list(BACKBONE_LR_GROUPS)}, "
                                    f"got {sorted(lrs)}")
        self.backbone_lr = {k: float(v) for k, v in lrs.items()}
        self._config = config
        self.backbones = Backbones(dataset, self.n_items, MIXED_PRECISION[self.mixed_precision],
                                   model=type(self).__name__)
        self.towers = list(self.backbones.towers)
        self.tower_a, self.tower_b = self.towers
        self.backbones.requires_grad_(False)
        self._adapt_backbones()
        d = self.embedding_size
        self.proj_a = nn.Linear(self.backbones.dims[self.tower_a], d)
        self.proj_b = nn.Linear(self.backbones.dims[self.tower_b], d)
        if self.backbones.is_image[self.tower_b]:
            # the authors' ViT classifier: Xavier-normal, zero bias
            nn.init.xavier_normal_(self.proj_b.weight)
            nn.init.zeros_(self.proj_b.bias)
        self.fusion = nn.Linear(2 * d, d)

    def _adapt_backbones(self) -> None:
        """Which backbone parameters train (default: none)."""

    def peft_parameters(self) -> list[nn.Parameter]:
        """Parameters added inside the backbones (adapters, LoRA A/B)."""
        return []

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        h_a = self.backbones.pooled_last(self.tower_a, ids)
        h_b = self.backbones.pooled_last(self.tower_b, ids)
        with self._autocast():
            e = self.fusion(torch.cat([F.gelu(self.proj_b(h_b)), F.gelu(self.proj_a(h_a))], dim=-1))
        return e.float()

    # ------------------------------------------------------------------ optimiser, reporting
    def _backbone_params(self, tower: str) -> list[nn.Parameter]:
        extra = {id(p) for p in self.peft_parameters()}
        return [p for p in self.backbones.models[tower].parameters() if p.requires_grad and id(p) not in extra]

    def item_side_groups(self):
        """``text_backbone`` / ``image_backbone`` (trainable backbone parameters of tower A / B) and
        ``peft`` (adapters, LoRA), lrs from ``backbone_lr``; the rest is ``recsys``."""
        return [
            ("text_backbone", self._backbone_params(self.tower_a), self.backbone_lr["text_backbone"]),
            ("image_backbone", self._backbone_params(self.tower_b), self.backbone_lr["image_backbone"]),
            ("peft", [p for p in self.peft_parameters() if p.requires_grad], self.backbone_lr["peft"]),
        ]

    def item_side_counts(self) -> dict[str, int]:
        return {
            f"{self.tower_a} backbone": trainable_parameters(self._backbone_params(self.tower_a)),
            f"{self.tower_b} backbone": trainable_parameters(self._backbone_params(self.tower_b)),
            "adapters": trainable_parameters(self.peft_parameters()),
            "heads": trainable_parameters(self.proj_a, self.proj_b),
            "fusion": trainable_parameters(self.fusion),
        }


class FFT(IntraBaseline):
    """Full fine-tuning: every backbone parameter trains (backbones in train mode)."""

    properties = ("IISAN", "Baseline", "FFT")

    def _adapt_backbones(self) -> None:
        self.backbones.requires_grad_(True)


class Adapter(IntraBaseline):
    """Houlsby adapters (2 per layer, r = ``adapter_size``) in frozen backbones."""

    properties = ("IISAN", "Baseline", "Adapter")

    def _adapt_backbones(self) -> None:
        size, act = int(self._config["adapter_size"]), str(self._config["adapter_activation"])
        adapters = []
        for t in self.towers:
            adapters += insert_houlsby_adapters(self.backbones.models[t], size, act)
        for a in adapters:
            a.requires_grad_(True)
        self._adapters = adapters  # a plain list: the modules are registered inside the backbones

    def peft_parameters(self) -> list[nn.Parameter]:
        return [p for a in self._adapters for p in a.parameters()]


class LoRA(IntraBaseline):
    """peft LoRA (r = ``lora_r``, alpha = ``lora_alpha``) on every query / value projection of both
    backbones; the pretrained weights are kept and frozen, only ``lora_A`` / ``lora_B`` train."""

    properties = ("IISAN", "Baseline", "LoRA")

    def _adapt_backbones(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = self._config
        for t in self.towers:
            model = self.backbones.models[t]
            names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            targets = [n for n in LORA_TARGETS if n in names]
            if not targets:
                raise PluginConfigError(f"LoRA: backbone of tower '{t}' has no query/value Linears {LORA_TARGETS}")
            lora = LoraConfig(r=int(cfg["lora_r"]), lora_alpha=float(cfg["lora_alpha"]),
                              lora_dropout=float(cfg["lora_dropout"]), target_modules=targets, bias="none")
            self.backbones.models[t] = inject_adapter_in_model(lora, model)
        for n, p in self.backbones.models.named_parameters():
            p.requires_grad_("lora_" in n)

    def peft_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.backbones.models.named_parameters() if "lora_" in n]


class BitFit(IntraBaseline):
    """Only the backbones' bias parameters (Linear, conv, LayerNorm) train."""

    properties = ("IISAN", "Baseline", "BitFit")

    def _adapt_backbones(self) -> None:
        for n, p in self.backbones.models.named_parameters():
            p.requires_grad_(n.endswith("bias"))
