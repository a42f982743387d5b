"""The two protocols' defaults, resolved once, when a config is built.

RecBole's protocol is the default (leave-one-out, RecBole's prefix augmentation, full ranking
without history masking, selection on ``valid_metric`` with RecBole's rule). ``paper_protocol:
True`` is the authors' (their public code, github.com/GAIR-Lab/IISAN, ``Code_Cached``; IISAN-Versa,
Fu et al., IEEE TKDE, arXiv:2411.02992, Sec. V-A): each user's last 13 items, the whole history
masked at ranking, batch 64, selection and early stopping on validation HR@10 with the authors' rule.
Every key the user sets wins (``user_set``).
"""
from __future__ import annotations

from typing import Any

from recbole_iisan.config.checks import check_metrics, file_dicts

#: what ``paper_protocol: True`` changes when the user did not set the key: the authors' code
#: (github.com/GAIR-Lab/IISAN ``Code_Cached/scripts/run_IISAN.py``; IISAN-Versa, TKDE, arXiv
#: 2411.02992, Sec. V-A): batch 64, selection and early stopping on validation HR@10 (patience 10)
PAPER_PROTOCOL_DEFAULTS = {"valid_metric": "Hit@10", "stopping_step": 10, "train_batch_size": 64}


def user_set(config: Any, key: str) -> bool:
    """Whether the user gave ``key`` (command line, ``config_dict`` or a config file of their own)
    rather than the plugin's yaml files. A user file that repeats the plugin's default value
    counts as not given."""
    for layer in ("cmd_config_dict", "variable_config_dict"):
        if key in (getattr(config, layer, None) or {}):
            return True
    files = getattr(config, "file_config_dict", None) or {}
    if key not in files:
        return False
    plugin = file_dicts(getattr(config, "plugin_files", []) or [])
    return key not in plugin or plugin[key] != files[key]


def _auto(config: Any, key: str, paper_value: Any, recbole_value: Any, auto_values=(None, "auto")) -> None:
    """``config[key]`` from its automatic value to the protocol's; a key the model's yaml files do
    not declare stays absent (RecBole's ``Config`` answers None for any absent key)."""
    if key not in getattr(config, "final_config_dict", config):
        return
    if config[key] in auto_values:
        config[key] = paper_value if config["paper_protocol"] else recbole_value


def resolve_protocol(config: Any) -> None:
    """Every protocol-dependent default, resolved in place, once (idempotent; also applied to the
    config a checkpoint holds).

    - ``mask_history: ~`` -> ``paper_protocol``;
    - ``selection_rule: ~`` -> ``authors`` under the paper protocol (the first epoch whose
      unrounded validation score is strictly higher), else ``recbole`` (RecBole's ``>=`` on the
      4-decimal rounded score: the later of tied epochs);
    - plugin models: ``loss_positions: auto`` -> ``all`` (every position of the user's window)
      under the paper protocol, else ``last``; ``user_encoder: ~`` -> ``authors`` / ``recbole``;
      ``item_id_embedding: ~`` -> ``False`` under the paper protocol (the paper's items are content
      only), else ``True`` (it improved NDCG@10 over three seeds on Scientific under RecBole's
      protocol: ``results/scientific_item_id``);
    - under the paper protocol, :data:`PAPER_PROTOCOL_DEFAULTS` for every key the user did not set.
    Then ``valid_metric`` must be computed by the run (one line otherwise)."""
    config["paper_protocol"] = bool(config["paper_protocol"])
    _auto(config, "mask_history", True, False, auto_values=(None,))
    _auto(config, "selection_rule", "authors", "recbole")
    _auto(config, "loss_positions", "all", "last")
    _auto(config, "user_encoder", "authors", "recbole")
    _auto(config, "item_id_embedding", False, True, auto_values=(None,))
    if config["paper_protocol"]:
        for key, value in PAPER_PROTOCOL_DEFAULTS.items():
            if not user_set(config, key):
                config[key] = value
    check_metrics(config)
