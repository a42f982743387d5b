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


def write_tiny_dataset(root: Path, name: str = "tiny", n_users: int = 60, n_items: int = 40,
                       seq_len: tuple[int, int] = (5, 9), seed: int = 0) -> Path:
    """Atomic files ``<root>/<name>/<name>.inter/.item`` with random sequences and titles."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        n = rng.randint(*seq_len)
        # a popular head so that there is something to learn
        items = [rng.choice(range(n_items // 4)) if rng.random() < 0.5 else rng.randrange(n_items) for _ in range(n)]
        lines += [f"u{u}\ti{it}\t{t}" for t, it in enumerate(items)]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\ttitle:token_seq"]
    items += [f"i{i}\t{' '.join(rng.sample(WORDS, 3))} {i}" for i in range(n_items)]
    (folder / f"{name}.item").write_text("\n".join(items) + "\n")
    return folder


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """data_path (parent folder) holding the dataset 'tiny'."""
    write_tiny_dataset(tmp_path)
    return tmp_path
