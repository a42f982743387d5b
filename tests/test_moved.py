"""Import paths of 0.1 fail with one line naming the new home (recbole_iisan/utils/moved.py)."""
from __future__ import annotations

import importlib

import pytest

from recbole_iisan.utils.moved import MOVED


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_an_old_module_path_names_its_new_home(old: str, new: str) -> None:
    importlib.import_module(new)  # the new home exists
    with pytest.raises(ModuleNotFoundError) as exc:
        importlib.import_module(old)
    assert str(exc.value) == f"{old} moved to {new} in recbole-iisan 0.2: import it from there"


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_from_package_import_old_module_names_its_new_home(old: str, new: str) -> None:
    package, name = old.rsplit(".", 1)
    with pytest.raises(ModuleNotFoundError) as exc:
        exec(f"from {package} import {name}", {})
    assert str(exc.value) == f"{old} moved to {new} in recbole-iisan 0.2: import it from there"


def test_old_names_of_moved_helpers_name_their_new_home() -> None:
    with pytest.raises(ImportError, match=r"recbole_iisan\.report\.markdown_table moved to recbole_iisan\.utils\.tables"):
        from recbole_iisan.report import markdown_table  # noqa: F401
    with pytest.raises(ImportError, match=r"recbole_iisan\.utils\.atomic_write_json moved to recbole_iisan\.utils\.files"):
        from recbole_iisan.utils import atomic_write_json  # noqa: F401
    import recbole_iisan.utils

    assert not hasattr(recbole_iisan.utils, "no_such_name")  # other names: the usual AttributeError


def test_the_public_entry_points_kept_their_paths() -> None:
    from recbole_iisan.quick_start import prepare_inputs, run  # noqa: F401
    from recbole_iisan.trainer import PluginTrainer  # noqa: F401
    from recbole_iisan.config import build_config  # noqa: F401
    for command in ("prepare", "download", "build_cache", "report"):
        assert callable(importlib.import_module(f"recbole_iisan.{command}").main)
