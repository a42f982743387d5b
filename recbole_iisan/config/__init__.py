"""The one config path (RecBole's ``Config`` + the plugin's yaml files, checks and protocols).

:func:`build_config` is what every entry point calls; see :mod:`.configurator` (files, command
line, types), :mod:`.protocol` (the two protocols' defaults, resolved at build time) and
:mod:`.checks` (ranges, enumerations, unknown keys, yaml files).
"""
from recbole_iisan.config.configurator import (PLUGIN_MODELS, PluginConfig, build_config, get_model_class,
                                               parse_overrides, parse_value, plugin_model_names)
from recbole_iisan.config.protocol import resolve_protocol

__all__ = ["PLUGIN_MODELS", "PluginConfig", "build_config", "get_model_class", "parse_overrides", "parse_value",
           "plugin_model_names", "resolve_protocol"]
