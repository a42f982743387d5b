"""Shared fixtures: small real datasets written as RecBole atomic files, and paths to ../shared."""
from __future__ import annotations

import os
import re
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# property-based tests (tests/test_fuzz_*.py, tests/fuzzing.py): the default profile "ci" is bounded
# and reproducible; --hypothesis-profile=long runs 20 times as many random examples
_FUZZ_COMMON = dict(deadline=None, print_blob=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, derandomize=True, **_FUZZ_COMMON)
settings.register_profile("long", max_examples=2000, **_FUZZ_COMMON)
settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SCIENTIFIC_RAW = SHARED / "datasets" / "Scientific"
POSTERS = SHARED / "datasets" / "ml-100k-posters"
DINOV2 = SHARED / "models" / "dinov2-small"

# the vocabulary of the tiny test tokenizers (tests/test_encoders.py), so titles differ after tokenising
WORDS = ("the a red blue green pipette tube glass flask lab digital scale meter set of 10 ml box "
         "steel clamp").split()


def reference_hit_ndcg(model, test_data, k: int = 10) -> tuple[list[float], list[float]]:
    """Each test user's Hit@k and NDCG@k computed here, independently of RecBole's evaluator: the
    rank of the target among the model's full-sort scores (the padding item excluded, history
    items masked as RecBole's loader masks them)."""
    import math

    import numpy as np
    import torch

    hits: list[float] = []
    ndcgs: list[float] = []
    with torch.no_grad():
        for inter, _hist, _pu, pos_i in test_data:
            scores = model.full_sort_predict(inter)
            scores[:, 0] = -np.inf
            target = scores[torch.arange(len(pos_i)), pos_i]
            rank = (scores > target[:, None]).sum(1) + 1
            hits += (rank <= k).float().tolist()
            ndcgs += [1.0 / math.log2(r + 1) if r <= k else 0.0 for r in rank.tolist()]
    return hits, ndcgs


def plugin_defaults(*names: str) -> dict:
    """The plugin's yaml defaults (``properties/overall.yaml`` then ``properties/<name>.yaml``, e.g.
    ``IISAN``) as a plain dict, for tests that call a module with a dict config."""
    from recbole_iisan.config.checks import file_dicts
    from recbole_iisan.config.configurator import PROPERTIES_DIR

    return file_dicts([str(PROPERTIES_DIR / "overall.yaml")] + [str(PROPERTIES_DIR / f"{n}.yaml") for n in names or ("IISAN",)])


def write_atomic_files(root: Path, name: str, sequences: dict, items: dict | None = None,
                       item_fields: dict | None = None) -> Path:
    """The one writer of test datasets: RecBole atomic files ``<root>/<name>/<name>.inter`` (each
    user's items in time order, timestamps 0, 1, ... per user) and, with ``items`` ({item: {field:
    value}}), ``<name>.item`` with the columns ``item_fields`` ({field: RecBole type}, default a
    ``title:token_seq``)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user, seq in sequences.items():
        lines += [f"{user}\t{it}\t{t}" for t, it in enumerate(seq)]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    if items is not None:
        fields = item_fields or {"title": "token_seq"}
        rows = ["\t".join(["item_id:token"] + [f"{f}:{t}" for f, t in fields.items()])]
        rows += ["\t".join([str(it)] + [str(cols.get(f, "")) for f in fields]) for it, cols in items.items()]
        (folder / f"{name}.item").write_text("\n".join(rows) + "\n")
    return folder


def write_tiny_dataset(root: Path, name: str = "tiny", n_users: int = 60, n_items: int = 40,
                       seq_len: tuple[int, int] = (5, 9), seed: int = 0) -> Path:
    """Atomic files ``<root>/<name>/<name>.inter/.item`` with random sequences and titles."""
    rng = random.Random(seed)
    sequences = {}
    for u in range(n_users):
        n = rng.randint(*seq_len)
        # a popular head so that there is something to learn
        sequences[f"u{u}"] = [f"i{rng.choice(range(n_items // 4)) if rng.random() < 0.5 else rng.randrange(n_items)}"
                              for _ in range(n)]
    items = {f"i{i}": {"title": f"{' '.join(rng.sample(WORDS, 3))} {i}"} for i in range(n_items)}
    return write_atomic_files(root, name, sequences, items)


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """data_path (parent folder) holding the dataset 'tiny'."""
    write_tiny_dataset(tmp_path)
    return tmp_path


def trials_table(out: str) -> list[str]:
    """The plugin's table of trials in a search's printed output: its header (``| trial  | ...``)
    and the rows after it. Ray Tune's own progress tables also start with ``| `` and appear
    whenever a trial outlasts Ray's report interval, so they are not counted."""
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\| trial +\|", line)]
    if not starts:
        return []
    table = []
    for line in lines[starts[-1]:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return [table[0]] + [l for l in table[1:] if not set(l) <= set("|-: ")]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many examples each property-based test ran, and how long they took (tests/fuzzing.py)."""
    import sys

    fuzzing = sys.modules.get("fuzzing")
    counts = getattr(fuzzing, "COUNTS", None)
    if not counts:
        return
    terminalreporter.section(f"hypothesis examples (profile {settings.get_current_profile_name()})")
    for name, (n, secs) in sorted(counts.items()):
        terminalreporter.write_line(f"{name:<60} {n:>5} examples {secs:>7.1f} s")
