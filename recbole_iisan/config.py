"""Building a RecBole ``Config`` for plugin and RecBole models alike.

Config files, lowest priority first: ``properties/overall.yaml``, ``properties/<Model>.yaml``,
``properties/<dataset>.yaml``, ``properties/<dataset>/<Model>.yaml``, then the user's ``--config_files``, then ``config_dict`` and the
command line (RecBole's own order). Plugin models are passed to RecBole as classes, so RecBole
reads their defaults from our yaml (it would find none of its own).

Types: every key documented in ``properties/*.yaml`` with a typed comment ``# (int) ...`` is
checked after the merge, so ``--sanb_size=abc`` ends in one line naming the key and the type.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from recbole.config import Config

PROPERTIES_DIR = Path(__file__).resolve().parent.parent / "properties"

#: plugin model name -> "module:Class"
PLUGIN_MODELS: dict[str, str] = {
    "IISANVS": "recbole_iisan.model.iisan:IISANVS",
    "IISANVA": "recbole_iisan.model.iisan:IISANVA",
    "IISANUncached": "recbole_iisan.model.baselines:IISANUncached",
    "FFT": "recbole_iisan.model.baselines:FFT",
    "Adapter": "recbole_iisan.model.baselines:Adapter",
    "LoRA": "recbole_iisan.model.baselines:LoRA",
    "BitFit": "recbole_iisan.model.baselines:BitFit",
}

_TYPED_COMMENT = re.compile(r"^(\w+)\s*:.*#\s*\(([\w |,<>=.+-]+)\)")  # "(int)", "(int, >= 1)": see checks.py
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float, int),
    "str": (str,),
    "bool": (bool,),
    "list": (list, tuple),
    "dict": (dict,),
}


from recbole_iisan.errors import PluginConfigError  # noqa: F401  (re-exported)


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


def config_file_list(model: str, dataset: str, user_files: Optional[Iterable[str]] = None) -> list[str]:
    """The yaml files a run reads, lowest priority first."""
    files = [
        PROPERTIES_DIR / "overall.yaml",
        PROPERTIES_DIR / f"{model}.yaml",
        PROPERTIES_DIR / f"{dataset}.yaml",
        PROPERTIES_DIR / dataset / f"{model}.yaml",  # a model's settings for one dataset
    ]
    out = [str(f) for f in files if f.is_file()]
    for f in user_files or []:
        if not Path(f).is_file():
            raise PluginConfigError(f"config file not found: {f}")
        out.append(str(f))
    return out


def typed_keys(files: Optional[Iterable[str]] = None) -> dict[str, str]:
    """key -> accepted type names (``"int"``, ``"str|list"``), from the typed comments of the
    properties yaml files (``# (int) ...``, ``# (str or list) ...``); declarations of one key
    in several files are united."""
    files = files if files is not None else sorted(PROPERTIES_DIR.rglob("*.yaml"))
    types: dict[str, set[str]] = {}
    for f in files:
        for line in Path(f).read_text().splitlines():
            m = _TYPED_COMMENT.match(line)
            if not m:
                continue
            names = {t for t in re.split(r"\s*(?:\bor\b|\||,)\s*", m.group(2).strip()) if t and t[0] not in "<>="}
            if names and names <= set(_TYPES):
                types.setdefault(m.group(1), set()).update(names)
    return {k: "|".join(sorted(v)) for k, v in types.items()}


def check_types(config: Any, types: Optional[dict[str, str]] = None) -> None:
    """Raise PluginConfigError for the first documented key whose value has the wrong type."""
    types = types if types is not None else typed_keys()
    for key, tnames in types.items():
        try:
            value = config[key]
        except KeyError:
            continue
        if value is None:
            continue
        ok = False
        for tname in tnames.split("|"):
            if isinstance(value, _TYPES[tname]) and not (tname in ("int", "float") and isinstance(value, bool)):
                ok = True
        if not ok:
            expected = " or ".join(tnames.split("|"))
            raise PluginConfigError(
                f"config key '{key}' must be {expected}, got {value!r} ({type(value).__name__})"
            )


def build_config(
    model: str,
    dataset: str,
    config_files: Optional[Iterable[str]] = None,
    config_dict: Optional[dict] = None,
) -> Config:
    """A RecBole Config for ``model`` (plugin or RecBole name) on ``dataset``, type-checked."""
    model_class = get_model_class(model)
    files = config_file_list(model, dataset, config_files)
    from recbole_iisan.checks import check_config_files, validate_config

    files = check_config_files(files)  # a yaml syntax error or a list: one line naming the file
    config = Config(
        model=model_class if model in PLUGIN_MODELS else model,
        dataset=dataset,
        config_file_list=files,
        config_dict=dict(config_dict or {}),
    )
    check_types(config)
    validate_config(config)  # ranges, enumerations, unknown keys (checks.py), before any data is read
    from recbole_iisan.data.towers import resolve_towers

    resolve_towers(config)
    return config
