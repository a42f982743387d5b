"""The one config path: every entry point (a run, ``--compare``, ``--tune``, DDP ranks,
``build_cache``, the benchmarks) builds its RecBole ``Config`` here.

Files, lowest priority first: ``properties/overall.yaml``, the model's yaml chain (a plugin model
lists it in its ``properties`` attribute, e.g. ``IISAN.yaml`` then ``IISANVS.yaml``; a RecBole
model has ``<Model>.yaml`` if the plugin ships one), ``properties/<dataset>.yaml``,
``properties/<dataset>/<Model>.yaml``, the user's ``--config_files``, then ``config_dict`` and the
command-line overrides (RecBole's own order). Command-line overrides are parsed once, here
(:func:`parse_overrides`, RecBole's value conversion), and handed to :class:`PluginConfig`, which
never reads ``sys.argv`` itself. A dict-valued key given as an override is merged into the
files' dict (``--iisan_lr="{'text_sanb': 1e-3}"`` changes one group).

Types: every key documented in ``properties/*.yaml`` with a typed comment ``# (int) ...`` is
checked after the merge, so ``--sanb_size=abc`` ends in one line naming the key and the type.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from recbole_iisan.utils.compat import require_recbole

require_recbole()  # without RecBole: one line saying how to install it (the command line prints it)

from recbole.config import Config  # noqa: E402

from recbole_iisan.config.checks import file_dicts  # noqa: E402
from recbole_iisan.utils.errors import PluginConfigError  # noqa: E402
from recbole_iisan.utils.files import properties_dir  # noqa: E402
from recbole_iisan.utils.values import literal_value, yaml_flow_value  # noqa: E402

PROPERTIES_DIR = properties_dir()

#: plugin model name -> "module:Class"
PLUGIN_MODELS: dict[str, str] = {
    "IISANVS": "recbole_iisan.model.iisan:IISANVS",
    "IISANVA": "recbole_iisan.model.iisan:IISANVA",
    "IISANUncached": "recbole_iisan.model.iisan:IISANUncached",
    "FFT": "recbole_iisan.model.baselines:FFT",
    "Adapter": "recbole_iisan.model.baselines:Adapter",
    "LoRA": "recbole_iisan.model.baselines:LoRA",
    "BitFit": "recbole_iisan.model.baselines:BitFit",
}

from recbole_iisan.config.checks import check_types, typed_keys  # noqa: E402,F401  (the type rules live in checks.py)


def plugin_model_names() -> list[str]:
    return list(PLUGIN_MODELS)


def get_model_class(name: str) -> type:
    """The model class for a plugin name or any RecBole model name."""
    if name in PLUGIN_MODELS:
        module, cls = PLUGIN_MODELS[name].split(":")
        return getattr(importlib.import_module(module), cls)
    from recbole.utils import get_model

    try:
        return get_model(name)
    except (ValueError, ImportError, ModuleNotFoundError) as exc:
        raise PluginConfigError(
            f"unknown model '{name}': use one of the plugin's {plugin_model_names()} "
            f"or a RecBole model name such as SASRec, GRU4Rec, BERT4Rec"
        ) from exc


# --------------------------------------------------------------------------------------------
# command-line overrides

def parse_value(text: str) -> Any:
    """One override value, read as data, never evaluated: Python literals (``2e-4`` -> 0.0002,
    ``[10,20]`` -> a list, ``"{'text_head': 1e-3}"`` -> a dict, ``True`` / ``true`` -> True,
    ``None``), a flow list or mapping of bare words (``[text, text2]``) as RecBole reads its yaml
    files, and anything else stays a string (``Hit@10``; a Python expression too: it is not run).
    RecBole's own conversion ``eval``s the text; see :mod:`recbole_iisan.utils.values`."""
    return yaml_flow_value(literal_value(text))


def parse_overrides(args: Sequence[str], where: str = "the command line") -> dict[str, Any]:
    """``--key=value`` arguments -> ``{key: value}`` (values as :func:`parse_value`). Anything
    else, or a key given twice with different values, is a one-line error."""
    out: dict[str, Any] = {}
    for arg in args:
        if not (arg.startswith("--") and "=" in arg):
            raise PluginConfigError(f"unrecognised argument {arg!r} on {where}: config keys are given as --key=value")
        key, _, value = arg[2:].partition("=")
        if not key:
            raise PluginConfigError(f"argument {arg!r} on {where} has no key: expected --key=value")
        parsed = parse_value(value)
        if key in out and out[key] != parsed:
            raise PluginConfigError(f"config key '{key}' is given twice on {where} ({out[key]!r} and {parsed!r})")
        out[key] = parsed
    return out


class PluginConfig(Config):
    """RecBole's ``Config`` whose command-line layer is given explicitly (never ``sys.argv``)."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None,
                 cmd_overrides: Optional[dict] = None):
        self._cmd_overrides = dict(cmd_overrides or {})
        super().__init__(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)

    def _load_cmd_line(self) -> dict:
        return dict(self._cmd_overrides)


# --------------------------------------------------------------------------------------------
# files and types

def config_file_list(model: str, dataset: str, user_files: Optional[Iterable[str]] = None) -> list[str]:
    """The yaml files a run reads, lowest priority first."""
    if not (PROPERTIES_DIR / "overall.yaml").is_file():
        raise PluginConfigError(f"the plugin's defaults are missing: no properties/overall.yaml in "
                                f"{PROPERTIES_DIR} or beside the package; reinstall recbole_iisan "
                                f"(pip install .) or run from a checkout of the repository")
    chain = getattr(get_model_class(model), "properties", None) if model in PLUGIN_MODELS else None
    names = list(chain) if chain else [model]
    files = [PROPERTIES_DIR / "overall.yaml"] + [PROPERTIES_DIR / f"{n}.yaml" for n in names] + [
        PROPERTIES_DIR / f"{dataset}.yaml",
        PROPERTIES_DIR / dataset / f"{model}.yaml",  # a model's settings for one dataset
    ]
    # RecBole cannot read a yaml file without keys (a model whose yaml only documents itself)
    out = [str(f) for f in files if f.is_file() and yaml.safe_load(f.read_text(encoding="utf-8"))]
    for f in user_files or []:
        if not Path(f).is_file():
            raise PluginConfigError(f"config file not found: {f}")
        out.append(str(f))
    return out


def _merge_dict_overrides(files: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """A dict-valued override is merged into the files' dict of the same key."""
    file_values = None
    out = dict(overrides)
    for key, value in overrides.items():
        if isinstance(value, dict):
            file_values = file_values if file_values is not None else file_dicts(files)
            base = file_values.get(key)
            if isinstance(base, dict):
                out[key] = {**base, **value}
    return out


def build_config(
    model: str,
    dataset: str,
    config_files: Optional[Iterable[str]] = None,
    config_dict: Optional[dict] = None,
    overrides: Optional[dict] = None,
) -> Config:
    """A RecBole Config for ``model`` (plugin or RecBole name) on ``dataset``, checked.

    ``overrides`` are the command line's ``--key=value`` (already parsed by :func:`parse_overrides`);
    they win over ``config_dict``, as in RecBole."""
    model_class = get_model_class(model)
    files = config_file_list(model, dataset, config_files)
    from recbole_iisan.config.checks import check_config_files, validate_config

    files = check_config_files(files)  # a yaml syntax error or a list: one line naming the file
    overrides = _merge_dict_overrides(files, dict(overrides or {}))
    config_dict = _merge_dict_overrides(files, dict(config_dict or {}))
    try:
        config = PluginConfig(
            model=model_class if model in PLUGIN_MODELS else model,
            dataset=dataset,
            config_file_list=files,
            config_dict=config_dict,
            cmd_overrides=overrides,
        )
    except (TypeError, ValueError, NotImplementedError) as exc:  # RecBole's own checks (``topk=[10,``, a metric it lacks)
        raise PluginConfigError(f"RecBole refused the config: {exc}") from None
    config.plugin_files = [f for f in files if Path(f).resolve().is_relative_to(PROPERTIES_DIR.resolve())]
    check_types(config)
    validate_config(config)  # ranges, enumerations, unknown keys (checks.py), before any data is read
    from recbole_iisan.config.protocol import resolve_protocol

    resolve_protocol(config)
    if model in PLUGIN_MODELS:  # RecBole's own models have no towers
        from recbole_iisan.towers.spec import resolve_towers

        resolve_towers(config)
    return config


# --------------------------------------------------------------------------------------------
# the config a checkpoint stores, and the Config rebuilt from it

#: keys of one process, never stored: DDP rank and rendezvous, the device, what trusts a pickle
RUNTIME_KEYS = frozenset({"local_rank", "world_size", "ip", "port", "nproc", "offset", "gpu_id", "device",
                          "single_spec", "trust_checkpoint", "item_state_caches"})


def _plain(value: Any) -> bool:
    """Whether ``value`` is data a checkpoint stores as JSON (numbers, strings, lists, dicts)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def plain_values(values: dict) -> dict[str, Any]:
    """The settings of ``values`` that a checkpoint stores: plain data, no per-process key."""
    out = {}
    for key, value in (values or {}).items():
        if isinstance(value, Path):
            value = str(value)
        if isinstance(key, str) and key not in RUNTIME_KEYS and _plain(value):
            out[key] = value
    return out


def stored_config(config: Any) -> dict[str, Any]:
    """What a checkpoint stores of its run's config: ``{"model", "dataset", "values"}``, the values
    being the run's own settings (yaml files, ``config_dict``, command line: RecBole's
    ``external_config_dict``), from which :func:`config_from_stored` rebuilds the Config."""
    values = getattr(config, "external_config_dict", None)
    if values is None:  # a plain dict config (tests, tools)
        values = dict(config)
    return {"model": str(config["model"]), "dataset": str(config["dataset"]), "values": plain_values(values)}


def legacy_stored_config(state: dict) -> dict[str, Any]:
    """:func:`stored_config` of a pickled legacy ``Config`` (its attributes, as data)."""
    final = state.get("final_config_dict") or {}
    model = final.get("model", state.get("model"))
    # the run's resolved values (RecBole's defaults may differ from the plugin's: MAX_ITEM_LIST_LENGTH),
    # minus what RecBole derives from others, then the values the user gave
    resolved = {k: v for k, v in plain_values(final).items() if k not in LEGACY_DERIVED_KEYS}
    return {"model": model if isinstance(model, str) else None, "dataset": final.get("dataset", state.get("dataset")),
            "values": {**resolved, **plain_values(state.get("external_config_dict") or {})}}


#: keys of a legacy ``final_config_dict`` that RecBole computes from others (``data_path`` joined with
#: the dataset, the normalised negative-sampling and evaluation settings, the metric direction)
LEGACY_DERIVED_KEYS = frozenset({"data_path", "train_neg_sample_args", "valid_neg_sample_args", "test_neg_sample_args",
                                 "eval_neg_sample_args", "valid_metric_bigger", "model", "dataset",
                                 "item_state_caches"})


def config_from_stored(stored: dict, config_files: Optional[Iterable[str]] = None, config_dict: Optional[dict] = None,
                       overrides: Optional[dict] = None) -> Config:
    """The Config of a checkpoint's run, built as the run built it (:func:`build_config`): the
    plugin's yaml files, then the stored values, then the user's ``config_files``, ``config_dict``
    and command-line ``overrides`` (``--data_path`` is the parent folder, as at training)."""
    from recbole_iisan.config.checks import check_config_files

    for f in config_files or []:
        if not Path(f).is_file():
            raise PluginConfigError(f"config file not found: {f}")
    user_files = check_config_files([str(f) for f in config_files or []])
    values = {**dict(stored.get("values") or {}), **file_dicts(user_files), **dict(config_dict or {})}
    return build_config(str(stored["model"]), str(stored["dataset"]), config_dict=values, overrides=overrides)
