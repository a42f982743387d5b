"""Checks of user input that end in one line instead of a traceback (or a silent bad run).

- :func:`check_types`: every documented key holds a value of its documented type (``typed_keys``).
- :func:`validate_config`: documented numeric ranges, enumerated string values and unknown keys
  of a built config (``config.build_config`` calls it once, after the type check), before any
  data is loaded.
- :func:`check_config_files`: every ``--config_files`` yaml parses and holds a mapping.
- a key given twice on the command line is refused by ``config.parse_overrides``.
- :func:`check_search_space`: every key of a ``hyper.test`` search space is documented and every
  value it can sample is valid.
- :func:`disk_full_guard`: a full disk during a write becomes one line saying so.

Where the rules come from (defaults and docs stay in one place, ``properties/*.yaml``):

- numeric ranges are written in the typed comment after the type, e.g.
  ``epochs: 100  # (int, >= 1) ...`` or ``hidden_dropout_prob: 0.1  # (float, >= 0, < 1) ...``;
  a key's range holds wherever the key is used (like its type);
- enumerations are RecBole's own convention in the description, ``... Range in ['relu', 'gelu'].``,
  read from the yaml files of the run's model only (``loss_type`` means different things to
  different models); ``layer_scheme`` / ``deep_layer_scheme`` take the schemes of
  ``layer_select.SCHEMES`` or a list of block indices;
- documented keys: RecBole's ``properties`` yaml files (overall, every model, dataset and quick-start
  file) + the plugin's ``properties/**/*.yaml`` + the per-tower keys ``<tower>_encoder|_fields|
  _max_length|_pooling``. Unknown keys get a warning with the closest documented key; with
  ``strict_config: True`` (``--strict``) they are an error.
"""
from __future__ import annotations

import ast
import difflib
import functools
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import yaml

from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.utils.files import properties_dir

PROPERTIES_DIR = properties_dir()

_TYPED_LINE = re.compile(r"^(\w+)\s*:[^#]*#\s*\(([^)]*)\)(.*)$")
_RANGE_PART = re.compile(r"^(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
_ENUM = re.compile(r"Range in (\[[^\]]*\])")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b,
}

#: keys RecBole sets or reads from ``config_dict`` without documenting them in its yaml files
INTERNAL_KEYS = frozenset({
    "model", "dataset", "MODEL_TYPE", "MODEL_INPUT_TYPE", "device", "single_spec", "local_rank",
    "world_size", "ip", "port", "nproc", "offset", "eval_type", "valid_metric_bigger",
})
TOWER_KEY_SUFFIXES = ("_encoder", "_fields", "_max_length", "_pooling")
LAYER_SCHEME_KEYS = ("layer_scheme", "deep_layer_scheme")


# --------------------------------------------------------------------------------------------
# rules from the yaml typed comments

_TYPED_COMMENT = re.compile(r"^(\w+)\s*:.*#\s*\(([\w |,<>=.+-]+)\)")  # "(int)", "(int, >= 1)": the ranges below
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float, int),
    "str": (str,),
    "bool": (bool,),
    "list": (list, tuple),
    "dict": (dict,),
}


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



def _parse_rule(spec: str, tail: str) -> tuple[list[tuple[str, float]], Optional[list]]:
    """``'int, >= 1'`` + the description -> ([('>=', 1.0)], enumeration or None)."""
    bounds = []
    for part in (p.strip() for p in spec.split(",")):
        m = _RANGE_PART.match(part)
        if m:
            bounds.append((m.group(1), float(m.group(2))))
    enum = None
    m = _ENUM.search(tail)
    if m:
        try:
            values = ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            values = None
        if isinstance(values, list) and values:
            enum = values
    return bounds, enum


@functools.lru_cache(maxsize=None)
def _file_rules(path: str) -> dict[str, tuple[list, Optional[list]]]:
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = _TYPED_LINE.match(line)
        if m:
            bounds, enum = _parse_rule(m.group(2), m.group(3))
            if bounds or enum:
                out[m.group(1)] = (bounds, enum)
    return out


def _plugin_yaml_files() -> list[str]:
    return [str(p) for p in sorted(PROPERTIES_DIR.rglob("*.yaml"))]


def numeric_ranges(files: Optional[Iterable[str]] = None) -> dict[str, list[tuple[str, float]]]:
    """key -> [(op, bound), ...] from every plugin yaml (a key's range holds for every model)."""
    out: dict[str, list] = {}
    for f in files if files is not None else _plugin_yaml_files():
        for key, (bounds, _) in _file_rules(str(f)).items():
            if bounds:
                out[key] = bounds
    return out


def enumerations(files: Iterable[str]) -> dict[str, list]:
    """key -> allowed values (``Range in [...]``) from ``files``; later files win."""
    out: dict[str, list] = {}
    for f in files:
        for key, (_, enum) in _file_rules(str(f)).items():
            if enum:
                out[key] = enum
    return out


def _run_files(config: Any) -> list[str]:
    """The plugin yaml files this run read (``config.py`` records them on the Config)."""
    return list(getattr(config, "plugin_files", []) or [])


def _fmt_range(bounds: Sequence[tuple[str, float]]) -> str:
    return " and ".join(f"{op} {b:g}" for op, b in bounds)


def check_value(key: str, value: Any, bounds: Sequence[tuple[str, float]] = (), enum: Optional[Sequence] = None,
                where: str = "") -> None:
    """Raise PluginConfigError when ``value`` breaks the range or the enumeration of ``key``."""
    if value is None:
        return
    prefix = f"{where}: " if where else ""
    if bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)) or not all(_OPS[op](float(value), b) for op, b in bounds):
            raise PluginConfigError(f"{prefix}config key '{key}' must be {_fmt_range(bounds)}, got {value!r}")
    if key in LAYER_SCHEME_KEYS:
        _check_layer_scheme(key, value, prefix)
    elif enum and isinstance(value, (str, int, float, bool)) and value not in enum:
        raise PluginConfigError(f"{prefix}config key '{key}' must be one of {list(enum)}, got {value!r}")


def _check_layer_scheme(key: str, value: Any, prefix: str) -> None:
    from recbole_iisan.towers.layer_select import SCHEMES

    if isinstance(value, str):
        if value not in SCHEMES:
            close = difflib.get_close_matches(value, SCHEMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PluginConfigError(f"{prefix}config key '{key}' must be one of {list(SCHEMES)} or a list of "
                                    f"block indices, got {value!r}{hint}")
    elif isinstance(value, (list, tuple)):
        if not value or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in value):
            raise PluginConfigError(f"{prefix}config key '{key}': a list of block indices must hold integers "
                                    f">= 0, got {list(value)!r}")


def _rules_for(config: Any) -> tuple[dict, dict]:
    files = _run_files(config)
    enums = enumerations(files)
    return numeric_ranges(), enums


@functools.lru_cache(maxsize=1)
def nullable_keys() -> frozenset:
    """Keys some plugin yaml sets to ``~`` (None means something there, e.g. ``inter_sanb_size``)."""
    keys = set()
    for f in _plugin_yaml_files():
        data = yaml.load(Path(f).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        keys |= {str(k) for k, v in (data or {}).items() if v is None} if isinstance(data, dict) else set()
    return frozenset(keys)


def check_ranges(config: Any) -> None:
    """Documented numeric ranges and enumerations of every key the config holds; a documented
    key set to ``~`` whose default is not ``~`` is refused (it would fail far from the config)."""
    nullable = nullable_keys()
    for key in sorted(typed_keys()):
        if key in nullable:
            continue
        try:
            value = config[key]
        except KeyError:
            continue
        if value is None and key in _user_keys(config):
            raise PluginConfigError(f"config key '{key}' is ~ (None), which it does not take: give a value "
                                    f"or leave the key out for its default")
    ranges, enums = _rules_for(config)
    for key in sorted(set(ranges) | set(enums) | set(LAYER_SCHEME_KEYS)):
        try:
            value = config[key]
        except KeyError:
            continue
        check_value(key, value, ranges.get(key, ()), enums.get(key))


# --------------------------------------------------------------------------------------------
# unknown keys

def _yaml_keys(path: Path) -> set[str]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.FullLoader)
    except (OSError, yaml.YAMLError):
        return set()
    return {str(k) for k in data} if isinstance(data, dict) else set()


@functools.lru_cache(maxsize=1)
def documented_keys() -> frozenset:
    """Every key RecBole's yaml files and the plugin's yaml files document."""
    import recbole

    rb = Path(recbole.__file__).resolve().parent / "properties"
    files = [rb / "overall.yaml", rb / "dataset" / "sample.yaml", rb / "dataset" / "ml-100k.yaml"]
    files += sorted((rb / "model").glob("*.yaml")) + sorted((rb / "quick_start_config").glob("*.yaml"))
    files += sorted(PROPERTIES_DIR.rglob("*.yaml"))
    keys: set[str] = set(INTERNAL_KEYS)
    for f in files:
        keys |= _yaml_keys(f)
    return frozenset(keys)


def _user_keys(config: Any) -> list[str]:
    """The keys the user gave: config files, config_dict and the command line."""
    keys: dict[str, None] = {}
    for attr in ("file_config_dict", "variable_config_dict", "cmd_config_dict"):
        d = getattr(config, attr, None)
        if isinstance(d, dict):
            keys.update(dict.fromkeys(str(k) for k in d))
    if not keys and isinstance(config, dict):
        keys.update(dict.fromkeys(str(k) for k in config))
    return list(keys)


def _tower_names(config: Any) -> list[str]:
    try:
        towers = config["towers"]
    except KeyError:
        return []
    if isinstance(towers, str):
        return [t.strip() for t in towers.split(",") if t.strip()]
    return [str(t) for t in towers or []]


def unknown_keys(config: Any) -> list[tuple[str, Optional[str]]]:
    """[(key, closest documented key or None)] for every user key nobody documents."""
    known = documented_keys()
    towers = _tower_names(config)
    out = []
    for key in _user_keys(config):
        if key in known or any(key == t + s for t in towers for s in TOWER_KEY_SUFFIXES):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        out.append((key, close[0] if close else None))
    return out


def check_unknown_keys(config: Any, strict: bool = False, out=None) -> list[str]:
    """Warn (stderr) about unknown keys, or raise PluginConfigError for the first when ``strict``."""
    msgs = []
    for key, close in unknown_keys(config):
        hint = f" (did you mean '{close}'?)" if close else ""
        if strict:
            raise PluginConfigError(f"unknown config key '{key}'{hint}: no RecBole or plugin yaml documents it "
                                    f"(strict_config / --strict)")
        msg = f"unknown config key '{key}'{hint}: nothing reads it; --strict makes this an error"
        print(f"warning: {msg}", file=out or sys.stderr)
        msgs.append(msg)
    return msgs


def validate_config(config: Any, strict: Optional[bool] = None) -> None:
    """Ranges, enumerations and unknown keys of a built config (one line on the first problem)."""
    check_ranges(config)
    if strict is None:
        try:
            strict = bool(config["strict_config"])
        except KeyError:
            strict = False
    check_unknown_keys(config, strict=strict)


# --------------------------------------------------------------------------------------------
# config files and the command line

def check_config_files(paths: Iterable[str]) -> list[str]:
    """The yaml files that hold config keys; raises PluginConfigError naming the file (and the line
    for a syntax error) for a file that does not parse or holds something else than a mapping.
    Empty files (or only comments) are left out (RecBole cannot read them)."""
    out = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PluginConfigError(f"{path}: not a text (UTF-8) yaml file") from None
        except OSError as exc:
            raise PluginConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        try:
            data = yaml.load(text, Loader=yaml.FullLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise PluginConfigError(f"{where}: yaml syntax error: {problem}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise PluginConfigError(f"{path}: expected a mapping of config keys (key: value lines), "
                                    f"got a {type(data).__name__}")
        out.append(str(path))
    return out


# --------------------------------------------------------------------------------------------
# Ray Tune search spaces

def check_search_space(params: Sequence[Any], config: Any, hyper_file: str) -> None:
    """Every value a ``hyper.test`` line can sample is valid: each ``choice`` value, and the
    bounds of ``uniform`` / ``loguniform`` / ``quniform``. Raises ``'<file>:<line>: ...'``."""
    ranges, enums = _rules_for(config)
    known = documented_keys()
    for hp in params:
        where = f"{hyper_file}:{hp.lineno}"
        if hp.name not in known and not any(hp.name == t + s for t in _tower_names(config) for s in TOWER_KEY_SUFFIXES):
            close = difflib.get_close_matches(hp.name, sorted(known), n=1, cutoff=0.75)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PluginConfigError(f"{where}: unknown config key '{hp.name}'{hint}: no RecBole or plugin yaml "
                                    f"documents it, so searching over it would change nothing")
        if hp.kind == "choice":
            values = list(hp.values)
        elif hp.kind == "loguniform":
            values = [math.exp(v) for v in hp.values[:2]]
        elif hp.is_int:
            values = [int(v) for v in hp.values[:2]]
        else:
            values = [float(v) for v in hp.values[:2]]
        for v in values:
            _check_sample_type(hp, v, where)
            if hp.name in LAYER_SCHEME_KEYS or hp.name in enums or hp.name in ranges:
                check_value(hp.name, v, ranges.get(hp.name, ()), enums.get(hp.name), where=where)


def _check_sample_type(hp: Any, value: Any, where: str) -> None:
    """A sampled value has the key's documented type (a trial's config would refuse it)."""
    try:
        check_types({hp.name: value})
    except PluginConfigError as exc:
        hint = (f" ({hp.kind} samples floats: quniform with integral bounds and step samples integers)"
                if hp.kind != "choice" and isinstance(value, float) else "")
        raise PluginConfigError(f"{where}: {exc}{hint}") from None


# --------------------------------------------------------------------------------------------
# merged yaml files, computed metrics

def file_dicts(files: Sequence[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_recbole_yaml_loader()) or {}  # noqa: RecBole's loader
        if isinstance(data, dict):
            merged.update(data)
    return merged


def _recbole_yaml_loader():
    from recbole.config import Config

    return Config._build_yaml_loader(None)  # noqa: SLF001  (RecBole's yaml reading: 1e-4 is a float)


def check_metrics(config: Any) -> None:
    """``valid_metric`` must be one of the metrics the run computes (``metrics`` x ``topk``)."""
    valid = str(config["valid_metric"]).lower()
    topk = config["topk"] or []
    computed = {f"{m.lower()}@{k}" for m in (config["metrics"] or []) for k in topk}
    computed |= {m.lower() for m in (config["metrics"] or [])}  # metrics without a cut-off (e.g. MRR?)
    if valid not in computed:
        raise PluginConfigError(
            f"config key 'valid_metric' is {config['valid_metric']!r}, which this run does not compute "
            f"(metrics {config['metrics']} x topk {topk} gives {sorted(computed)}): choose one of them, "
            f"e.g. --valid_metric=NDCG@{topk[0] if topk else 10}"
        )
