"""Shared fixtures: small real datasets written as RecBole atomic files, and paths to ../shared."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SCIENTIFIC_RAW = SHARED / "datasets" / "Scientific"
POSTERS = SHARED / "datasets" / "ml-100k-posters"
DINOV2 = SHARED / "models" / "dinov2-small"

# the vocabulary of the tiny test tokenizers (tests/test_encoders.py), so titles differ after tokenising
WORDS = ("the a red blue green pipette tube glass flask lab digital scale meter set of 10 ml box "
         "steel clamp").split()


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
