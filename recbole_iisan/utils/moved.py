"""Import paths of versions before the package was laid out by role (0.1): importing one fails
with one line saying where the module lives now, instead of a bare ``ModuleNotFoundError``."""
from __future__ import annotations

import importlib.abc
import sys

#: old module -> new module
MOVED = {
    "recbole_iisan.breakdown": "recbole_iisan.evaluator.breakdown",
    "recbole_iisan.checkpoint": "recbole_iisan.trainer.checkpoint",
    "recbole_iisan.checks": "recbole_iisan.config.checks",
    "recbole_iisan.cli": "recbole_iisan.quick_start.cli",
    "recbole_iisan.cold_start": "recbole_iisan.evaluator.cold_start",
    "recbole_iisan.compat": "recbole_iisan.utils.compat",
    "recbole_iisan.errors": "recbole_iisan.utils.errors",
    "recbole_iisan.export": "recbole_iisan.serving.export",
    "recbole_iisan.new_items": "recbole_iisan.serving.new_items",
    "recbole_iisan.ranking": "recbole_iisan.evaluator.ranking",
    "recbole_iisan.recommend": "recbole_iisan.serving.recommend",
    "recbole_iisan.tuning": "recbole_iisan.quick_start.tune",
    "recbole_iisan.data.prepare": "recbole_iisan.data.atomic_files",
    "recbole_iisan.data.download": "recbole_iisan.data.sources",
    "recbole_iisan.data.state_store": "recbole_iisan.data.cache.storage",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers an import of a moved module with a ``ModuleNotFoundError`` naming its new home."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is not None:
            raise ModuleNotFoundError(f"{fullname} moved to {new} in recbole-iisan 0.2: import it from there",
                                      name=fullname)
        return None


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())


def moved_submodule(package: str, name: str) -> Exception:
    """The error of ``from package import name`` for a moved submodule: the finder's
    ``ModuleNotFoundError`` would be swallowed there and replaced by "cannot import name"."""
    fullname = f"{package}.{name}"
    if fullname in MOVED:
        return ModuleNotFoundError(f"{fullname} moved to {MOVED[fullname]} in recbole-iisan 0.2: import it from there",
                                   name=fullname)
    return AttributeError(f"module {package!r} has no attribute {name!r}")


def moved_attribute(module: str, name: str, where: dict[str, str]) -> Exception:
    """The error of ``module.name``: for a name that moved to ``where[name]`` an ``ImportError``
    naming its new home (an ``AttributeError`` would be replaced by Python's generic "cannot
    import name" in ``from module import name``), else the usual ``AttributeError``."""
    if name in where:
        return ImportError(f"{module}.{name} moved to {where[name]}.{name} in recbole-iisan 0.2: import it from there",
                           name=module)
    return AttributeError(f"module {module!r} has no attribute {name!r}")
