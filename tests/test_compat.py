"""recbole_iisan/utils/compat.py: each patch of RecBole 1.2.1 for today's numpy / torch / Ray, and the
pandas behaviour the ``pandas<3`` pin keeps (docs/installation.md has the table)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import recbole_iisan  # noqa: F401  (applies the patches)
from recbole_iisan.utils import compat

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# numpy 2: RecBole's removed aliases (np.float, np.bool, ...)

def test_recbole_config_builds_under_numpy_2(tiny_data):
    """RecBole's own ``compatibility_settings`` assigns ``np.float_`` (gone in numpy 2): every
    ``Config`` failed. The patched one sets the same aliases to the same types."""
    from recbole.config import Config

    original = Config.compatibility_settings.__wrapped__
    if int(np.__version__.split(".")[0]) >= 2:
        with pytest.raises(AttributeError, match="np.float_"):
            original(None)
    config = Config(model="SASRec", dataset="tiny", config_dict={"data_path": str(tiny_data),
                                                              "train_neg_sample_args": None})
    assert config["model"] == "SASRec"
    # what RecBole's aliases named before numpy 2: np.float_ was float64, np.complex_ complex128
    assert np.float is np.float64 and np.int is np.int_ and np.complex is np.complex128
    assert np.object is np.object_ and np.str is np.str_ and np.unicode is np.str_
    assert np.bool is np.bool_ and np.dtype(np.long) == np.dtype(np.int64)


def test_recbole_metrics_that_use_np_float_and_np_bool_give_the_textbook_values():
    """RecBole's NDCG / MRR / MAP (``dtype=np.float``) and GAUC (``dtype=np.bool``) on a hand-made
    ranking: the numbers are the definitions', computed here without RecBole."""
    from recbole.evaluator import metrics

    class Cfg(dict):
        def __init__(self):
            super().__init__(topk=[3], metric_decimal_place=12)

    # two users, top-3 lists: user 0 hits at ranks 2 and 3 (2 relevant items), user 1 at rank 1 (1 relevant)
    pos_index = np.array([[False, True, True], [True, False, False]])
    pos_len = np.array([2, 1])

    ndcg = metrics.NDCG(Cfg()).metric_info(pos_index, pos_len)
    dcg0 = 1 / np.log2(3) + 1 / np.log2(4)
    idcg0 = 1 + 1 / np.log2(3)
    assert ndcg.dtype == np.float64
    assert ndcg[0, 2] == pytest.approx(dcg0 / idcg0, abs=1e-12) and ndcg[1].tolist() == [1.0, 1.0, 1.0]

    mrr = metrics.MRR(Cfg()).metric_info(pos_index)
    assert mrr[0].tolist() == [0.0, 0.5, 0.5] and mrr[1].tolist() == [1.0, 1.0, 1.0]

    ap = metrics.MAP(Cfg()).metric_info(pos_index, pos_len)
    assert ap[0, 2] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-12) and ap[1, 2] == pytest.approx(1.0)

    # GAUC: user 0 ranks its positive 2nd of 3 (AUC 0.5), user 1 ranks its positive 1st of 4 (AUC 1)
    gauc = metrics.GAUC(Cfg()).metric_info(np.array([2, 1]), np.array([3, 4]), np.array([1, 1]))
    assert gauc == pytest.approx((0.5 + 1.0) / 2, abs=1e-12)  # weighted by positives per user


def test_numpy_aliases_are_set_at_import_for_ray_workers():
    """A fresh process that only imports the package (as a Ray worker does before unpickling a
    trial) has the aliases, without building a RecBole ``Config`` first."""
    code = "import recbole_iisan, numpy as np; from recbole.evaluator.metrics import MRR; " \
           "print(np.float.__name__, MRR({'topk': [1], 'metric_decimal_place': 4}).metric_info(np.array([[True]]))[0, 0])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["float64", "1.0"]


# --------------------------------------------------------------------------------------------
# torch >= 2.6: weights_only=True stays the default for RecBole's modules too (the plugin reads
# and writes its checkpoints itself: tests/test_checkpoint_file.py)

def test_importing_the_plugin_leaves_torch_load_safe():
    """No ``torch.load`` defaulting to ``weights_only=False`` for RecBole, no process-wide switch."""
    code = ("import os, torch, recbole_iisan, recbole.trainer.trainer as t, recbole.quick_start.quick_start as q; "
            "print(t.torch is torch, getattr(q, 'torch', torch) is torch, os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True, capture_output=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True", "None"]


# --------------------------------------------------------------------------------------------
# pandas: kept below 3 (setup.py). These are the RecBole behaviours pandas 3 breaks; they fail
# here if the pin is lifted without a patch.

def test_recbole_fills_missing_token_seq_and_float_values(tmp_path):
    """RecBole fills a missing ``token_seq`` with an empty sequence and a missing ``float`` with
    the column mean through chained ``df[col].fillna(..., inplace=True)``, which does nothing under
    pandas 3's copy-on-write; pandas 3 also breaks the ``token_seq`` remap ("Length of values")."""
    from recbole.config import Config
    from recbole.data import create_dataset

    d = tmp_path / "t"
    d.mkdir()
    (d / "t.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                               + "".join(f"u{u}\ti{(u + k) % 4}\t{k}\n" for u in range(6) for k in range(4)))
    (d / "t.item").write_text("item_id:token\ttitle:token_seq\tprice:float\n"
                              "i0\tred box\t1.0\ni1\t\t3.0\ni2\tblue box\t\ni3\tred tube\t8.0\n")
    config = Config(model="SASRec", dataset="t", config_dict={
        "data_path": str(tmp_path), "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                                                 "item": ["item_id", "title", "price"]},
        "normalize_all": False, "state": "error", "train_neg_sample_args": None, "use_gpu": False})
    ds = create_dataset(config)
    items = ds.item_feat  # still a DataFrame here, after RecBole's _fill_nan and _remap
    row = {tok: int(ds.token2id("item_id", tok)) for tok in ("i0", "i1", "i2", "i3")}
    assert items["price"][row["i2"]] == pytest.approx((1.0 + 3.0 + 8.0) / 3)  # the mean
    titles = {t: [str(w) for w in ds.id2token("title", np.asarray(items["title"][row[t]], dtype=np.int64))]
              for t in row}
    assert titles == {"i0": ["red", "box"], "i1": [], "i2": ["blue", "box"], "i3": ["red", "tube"]}


# --------------------------------------------------------------------------------------------
# RecBole itself installed (with --no-deps): without it, one line says how

def test_without_recbole_the_command_line_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['recbole'] = None\n"  # as if RecBole were not installed
            "from recbole_iisan.quick_start.cli import main\n"
            "sys.exit(main(['--model=SASRec', '--dataset=ml-100k']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, text=True, capture_output=True,
                          timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: RecBole 1.2.1 is not installed: run 'pip install --no-deps recbole==1.2.1'")


# --------------------------------------------------------------------------------------------
# known third-party warnings: filtered by module and message, nothing else

def test_known_warnings_are_filtered_narrowly(tmp_path):
    """RecBole's pandas ``fillna(inplace=True)`` warning (raised for real by a float column with a
    missing value) is filtered; the same category from another module, or another message from
    RecBole's module, still shows."""
    import warnings

    from recbole.config import Config
    from recbole.data import create_dataset

    d = tmp_path / "t"
    d.mkdir()
    (d / "t.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                               + "".join(f"u{u}\ti{(u + k) % 4}\t{k}\n" for u in range(6) for k in range(4)))
    (d / "t.item").write_text("item_id:token\tprice:float\ni0\t1.0\ni1\t\ni2\t3.0\ni3\t8.0\n")
    config = Config(model="SASRec", dataset="t", config_dict={
        "data_path": str(tmp_path), "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "price"]},
        "state": "error", "train_neg_sample_args": None, "use_gpu": False})
    message = compat.QUIET_WARNINGS[0][2]
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        compat._quiet_known_warnings()
        create_dataset(config)
        assert not [w for w in shown if "chained assignment" in str(w.message)]
        text = "A value is trying to be set on a copy of a DataFrame or Series through chained assignment"
        warnings.warn_explicit(text, FutureWarning, "x.py", 1, module="my_analysis")
        warnings.warn_explicit("something else", FutureWarning, "x.py", 1, module="recbole.data.dataset.dataset")
    assert [str(w.message) for w in shown] == [text, "something else"]
    with warnings.catch_warnings(record=True) as shown:  # the real warning, unfiltered: it is the one filtered
        warnings.resetwarnings()
        warnings.simplefilter("always")
        create_dataset(config)
    import re

    assert [w for w in shown if re.match(message, str(w.message))]
