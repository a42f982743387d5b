"""Houlsby (serial bottleneck) adapters inserted into a Hugging Face backbone by module replacement.

peft 0.21 has no bottleneck-adapter method, so the Adapter baseline (SIGIR'24 Sec. 4 baselines)
inserts them itself: 2 adapters per transformer layer, each the SANB block (ReLU bottleneck,
residual inside, N(0, 0.01^2) init).
"""
from __future__ import annotations

import torch
from torch import nn

from recbole_iisan.model.layers import SANB


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
