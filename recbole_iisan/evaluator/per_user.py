"""Each test user's metrics, saved beside a run's result file for paired comparisons.

A run writes ``<result>.users.csv`` next to ``<result>.json``: one row per test user, in the
order of RecBole's test data (internal user id order), with the user's raw id and the user's value
of every top-k metric the run computed (``hit@10``, ``ndcg@10``, ...). The values are the ones
RecBole's own metric classes compute per user before averaging
(:class:`recbole_iisan.trainer.trainer.RecordingEvaluator`), so their mean is the run's test metric before
RecBole rounds it. Runs of several models (and seeds) on one split hold the same users, which is
what a paired test over users needs (:mod:`recbole_iisan.evaluator.significance`).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.utils.files import PathLike, atomic_write_text

USER_COLUMN = "user_id"
SUFFIX = ".users.csv"


def path_for(result_file: PathLike) -> Path:
    """``DIR/NAME.users.csv`` for the result file ``DIR/NAME.json``."""
    p = Path(result_file)
    return p.with_name((p.name[:-5] if p.name.endswith(".json") else p.name) + SUFFIX)


def test_user_tokens(eval_data: Any) -> list[str]:
    """The raw user ids of an evaluation data loader's rows, in evaluation order."""
    ds = eval_data._dataset
    uids = ds.inter_feat[ds.uid_field].numpy()
    return [str(t) for t in ds.id2token(ds.uid_field, uids)]


def write(path: PathLike, users: Sequence[str], metrics: Mapping[str, np.ndarray]) -> Path:
    """One row per user: ``user_id`` then every metric (``%.10g``), written atomically."""
    import pandas as pd

    for name, values in metrics.items():
        if len(values) != len(users):
            raise ValueError(f"per-user metric {name}: {len(values)} values for {len(users)} users")
    frame = pd.DataFrame({USER_COLUMN: list(users), **{k: np.asarray(v, dtype=np.float64) for k, v in metrics.items()}})
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.10g")
    return atomic_write_text(path, buf.getvalue())


def read(path: PathLike) -> "Any":
    """The per-user table of a run (a pandas DataFrame indexed by ``user_id``); one line when the
    file is missing or not such a table."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise PluginConfigError(f"per-user metrics {p}: not found (written by a run beside its result file)")
    try:
        frame = pd.read_csv(p, dtype={USER_COLUMN: str})
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PluginConfigError(f"per-user metrics {p}: not a CSV table ({str(exc).splitlines()[0][:100]})") from None
    if USER_COLUMN not in frame.columns or len(frame.columns) < 2:
        raise PluginConfigError(f"per-user metrics {p}: expected a '{USER_COLUMN}' column and metric columns, "
                                f"got {list(frame.columns)[:5]}")
    if frame[USER_COLUMN].duplicated().any():
        first = frame[USER_COLUMN][frame[USER_COLUMN].duplicated()].iloc[0]
        raise PluginConfigError(f"per-user metrics {p}: user '{first}' appears twice")
    return frame.set_index(USER_COLUMN)
