"""Property-based tests of the hidden-state cache's manifest (``data/cache/``): a copy of a tiny
real cache whose ``manifest.json`` is edited (a value replaced by any JSON value, a key removed,
the whole file replaced by other JSON or by bytes) is either read as the clean cache (the states
are the clean ones, bit for bit) or refused in ONE ``CacheError`` line naming the folder, by
``load_states`` and by ``ensure_caches(cache_rebuild: never)``; never a traceback or a hang.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import event, example, given
from hypothesis import strategies as st

from fuzzing import fuzz, one_line
from test_cache_integrity import clean, copy_of  # noqa: F401  (the module's clean cache)

from recbole_iisan.data.cache import ensure_caches, load_states
from recbole_iisan.utils.errors import UserError

JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                    max_leaves=6)


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON object (into dicts and lists)."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, prefix + (i,))
    return out


def edited(man: dict, how: str, at: int, value: Any) -> Any:
    """The manifest with one edit: ``set`` a path to ``value``, ``drop`` a path, or ``whole``."""
    if how == "whole":
        return value
    man = json.loads(json.dumps(man))
    where = paths(man)[at % len(paths(man))]
    parent = man
    for k in where[:-1]:
        parent = parent[k]
    if how == "drop":
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    return man


class States(torch.Tensor):
    """The clean cache's states (short repr: hypothesis prints its arguments with a failing example)."""

    def __repr__(self, *args, **kwargs) -> str:
        return f"<clean states {tuple(self.shape)}>"


@pytest.fixture(scope="module")
def clean_states(clean):  # noqa: F811
    return load_states(clean["folder"], clean["tokens"], clean["layers"])[0].as_subclass(States)




@fuzz(40, timeout=60)
@given(how=st.sampled_from(["set", "set", "drop", "whole"]), at=st.integers(0, 10_000), value=JSON,
       raw=st.one_of(st.none(), st.none(), st.binary(max_size=12)))
# found by this test: a manifest holding a JSON list (not an object) ended in an AttributeError
@example(how="whole", at=0, value=[], raw=None)
@example(how="set", at=0, value=None, raw=b"\xff")
def test_edited_manifest_is_read_as_the_clean_cache_or_refused_in_one_line(clean, clean_states, tmp_path_factory,  # noqa: F811
                                                                           how, at, value, raw):
    c, folder = copy_of(clean, tmp_path_factory.mktemp("man"))
    man = json.loads((folder / "manifest.json").read_text())
    text = json.dumps(edited(man, how, at, value)).encode()
    (folder / "manifest.json").write_bytes(text if raw is None else raw + text)
    try:
        states, missing = load_states(folder, clean["tokens"], clean["layers"])
    except UserError as exc:
        msg = one_line(str(exc))
        assert str(folder) in msg, msg
        event("load: refused")
    else:
        event("load: read")
        assert not missing and torch.equal(states, clean_states.as_subclass(torch.Tensor))
    try:
        got = ensure_caches(dict(c, cache_rebuild="never"))["text"]
    except UserError as exc:
        msg = one_line(str(exc))
        event("ensure: refused")
        assert str(folder) in msg or str(Path(c["cache_dir"])) in msg, msg
    else:
        event("ensure: reused")
        assert torch.equal(load_states(got, clean["tokens"], clean["layers"])[0], clean_states.as_subclass(torch.Tensor))
