"""Cold-start evaluation: a fraction of the items never seen in training.

``cold_start_items: 0.1`` holds 10% of the items (drawn uniformly with the run's ``seed``) out of
training entirely and evaluates on the users whose test target is one of them. RecBole's split is
kept as it is: the dataset's ``build()`` (which ``data_preparation`` calls) splits and augments
first, then

- train: every row whose target is a held-out item is dropped, and held-out items are removed from
  the input sequences of the other rows (the remaining items keep their order; a row left with no
  input is dropped): no interaction with a held-out item is trained on;
- valid: unchanged (early stopping sees every user, as in the normal protocol);
- test: only the rows whose target is a held-out item.

Every model of a run (IISAN, SASRec, GRU4Rec...) gets the same held-out items and rows, so
``--compare=SASRec,GRU4Rec,IISANVS --cold_start_items=0.1`` compares them on one split. An ID model
can only score a held-out item with its untrained embedding; a content model embeds it from its
text and images.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.utils.files import setting

logger = logging.getLogger()


def fraction(config: Any) -> float:
    f = setting(config, "cold_start_items")
    f = 0.0 if f in (None, False) else f
    try:
        f = float(f)
    except (TypeError, ValueError):
        raise PluginConfigError(f"config key 'cold_start_items': expected a fraction in [0, 1), got {f!r}") from None
    if not 0.0 <= f < 1.0:
        raise PluginConfigError(f"config key 'cold_start_items': expected a fraction in [0, 1), got {f}")
    return f


def held_out_items(n_items: int, frac: float, seed: int) -> np.ndarray:
    """Sorted internal ids (1..n_items-1) of the held-out items."""
    n = int(round(frac * (n_items - 1)))
    rng = np.random.default_rng(int(seed))
    return np.sort(rng.choice(np.arange(1, n_items), size=n, replace=False))


def strip_training(dataset: Any, held: torch.Tensor) -> Any:
    """A copy of an augmented training dataset without any interaction with ``held`` items."""
    feat = dataset.inter_feat
    iid = dataset.iid_field
    suffix = dataset.config["LIST_SUFFIX"]
    len_f = dataset.config["ITEM_LIST_LENGTH_FIELD"]
    seq = feat[iid + suffix]
    L = seq.size(1)
    pos = torch.arange(L).unsqueeze(0)
    real = pos < feat[len_f].unsqueeze(1)
    keep = real & ~torch.isin(seq, held)
    # stable compaction: kept positions first, in their order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    new_len = keep.sum(dim=1)
    valid = pos < new_len.unsqueeze(1)
    for f in list(feat.interaction):
        v = feat[f]
        if f.endswith(suffix) and v.dim() >= 2 and v.size(1) == L:
            g = torch.gather(v, 1, order.view(order.shape + (1,) * (v.dim() - 2)).expand_as(v))
            feat.interaction[f] = torch.where(valid.view(valid.shape + (1,) * (v.dim() - 2)), g, torch.zeros_like(g))
    feat.interaction[len_f] = new_len.to(feat[len_f].dtype)
    rows = (~torch.isin(feat[iid], held)) & (new_len > 0)
    return dataset.copy(feat[rows])


def build(dataset: Any) -> list:
    """RecBole's ``build()`` (split and augmentation) of ``dataset``, then the cold-start filter."""
    datasets = type(dataset).build(dataset)
    frac = fraction(dataset.config)
    if frac == 0.0 or len(datasets) != 3:
        return datasets
    train, valid, test = datasets
    held_np = held_out_items(dataset.item_num, frac, dataset.config["seed"])
    held = torch.as_tensor(held_np, dtype=torch.long)
    n_train = len(train)
    train = strip_training(train, held)
    test = test.copy(test.inter_feat[torch.isin(test.inter_feat[dataset.iid_field], held)])
    dataset.cold_items = held_np
    logger.info(f"cold start: {len(held_np)} of {dataset.item_num - 1} items held out of training "
                f"(cold_start_items: {frac}); training rows {n_train} -> {len(train)}; "
                f"test on the {len(test)} users whose target is held out")
    if len(test) == 0:
        raise PluginConfigError(f"cold_start_items: {frac}: no test user has a held-out target; use a larger fraction")
    return [train, valid, test]


def apply(config: Any, dataset: Any) -> Any:
    """``dataset`` with the cold-start split when ``cold_start_items`` > 0: its ``build()`` (what
    RecBole's ``data_preparation`` calls) becomes :func:`build`; nothing else of it changes."""
    if fraction(config) == 0.0:
        return dataset
    import types

    dataset.build = types.MethodType(build, dataset)
    return dataset
