"""Config values given as text, read as data: never evaluated.

RecBole 1.2.1 converts every string of the command line and of ``config_dict`` (a Ray Tune trial's
values arrive there) with ``eval()`` (``Config._convert_config_dict``), so ``--learner=__import__(
"os").system(...)`` or a ``hyper.test`` choice of that text runs Python. :func:`literal_value` is
the same conversion without ``eval``: Python literals only (``ast.literal_eval``: numbers such as
``2e-4``, strings, lists, tuples, dicts, booleans, ``None``), ``true`` / ``false`` in any case, and
anything else stays the string it was (``Hit@10``, ``SASRec``, a payload). :func:`yaml_flow_value`
reads a flow list or mapping of bare words (``[text, text2]``) as RecBole reads its yaml files, with
a safe loader (no python tags).
"""
from __future__ import annotations

import ast
import re
from typing import Any

import yaml

#: what a converted value may be (RecBole's own rule, without ``Enum``: a literal is never one)
PLAIN = (str, int, float, list, tuple, dict, bool)


def literal_value(text: Any) -> Any:
    """``text`` converted as RecBole converts a config string, without running anything."""
    if not isinstance(text, str):
        return text
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        lowered = text.strip().lower()
        return True if lowered == "true" else False if lowered == "false" else text
    if value is not None and not isinstance(value, PLAIN):  # a set, bytes or complex: kept as text
        return text
    return value


class SafeRecBoleLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with RecBole's float rule (``1e-4`` is a float, as in its yaml files)."""


SafeRecBoleLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_flow_value(text: str) -> Any:
    """A yaml flow list or mapping (``[text, text2]``, ``{text_head: 1e-3}``) as a list or dict;
    anything else (or text that is not yaml) comes back unchanged."""
    if not isinstance(text, str) or text.strip()[:1] not in ("[", "{"):
        return text
    try:
        loaded = yaml.load(text, Loader=SafeRecBoleLoader)
    except yaml.YAMLError:
        return text
    return loaded if isinstance(loaded, (list, dict)) else text
