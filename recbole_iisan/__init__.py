"""recbole-iisan: IISAN and IISAN-Versa multimodal sequential recommenders for RecBole.

The package, by role (RecBole's own layout): ``config`` (the one config path), ``data``
(atomic files, downloads, images, datasets, the encoder caches), ``towers`` (the frozen encoders),
``model`` (IISAN, the baselines, the loss, the user encoder), ``trainer`` (training, checkpoints,
Ray Tune), ``evaluator`` (ranking, breakdowns, per-user metrics, statistics), ``serving``
(recommend, export, new items), ``quick_start`` (runs, comparisons, command lines) and ``utils``.
"""
from recbole_iisan.utils import compat as _compat
from recbole_iisan.utils import moved as _moved

__version__ = "0.2.0"

_compat.apply()
_moved.install()


def __getattr__(name: str):  # ``from recbole_iisan import cli``: say where a 0.1 module went
    raise _moved.moved_submodule(__name__, name)
