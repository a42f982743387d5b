"""Items that did not exist at training time, represented without retraining.

IISAN's items are their content: a new item needs one pass of the frozen encoders, then the
trained side network. :func:`encode_new_items` reads a TSV of new items, builds their hidden-state
cache as a new shard (``data/cache.ensure_cache`` over exactly those items: the same encoder
code, batching, pooling, storage dtype and LMDB format as the training cache, in its own
content-addressed folder under the cache root, so a rerun reuses it), standardises the states
with the TRAINED items' statistics when the model uses ``state_norm: dim``, and runs the trained
side network. Nothing of the trained model changes.

The TSV: ``raw_id TAB title [TAB image_path]`` per line (every text tower reads the title), or a
header line naming the columns (``item_id  title  class ...``, the first column the id): then each
text tower joins its ``<tower>_fields`` as the cache builder does, and an ``image`` column gives
image paths (relative to the TSV's folder).
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.utils.files import PathLike

logger = logging.getLogger()


TITLE_FIELDS = ("title", "movie_title", "name")


def title_field(config: Any, names: Sequence[str]) -> Optional[str]:
    """The column shown as an item's title: the first text field of tower A, else a title-like one."""
    try:
        fields = config["text_fields"]
    except (KeyError, TypeError):
        fields = None
    fields = [] if fields is None else (list(fields) if isinstance(fields, (list, tuple)) else [fields])
    found = [f for f in fields + list(TITLE_FIELDS) if f in names]
    return found[0] if found else None


@dataclass
class NewItems:
    """New items: raw ids, titles and their embeddings ``[M, d]`` (internal ids follow the known ones)."""

    tokens: list[str]
    titles: list[str]
    embeddings: torch.Tensor
    n_known: int

    def item_ids(self, run: Any, tokens: Sequence[str]) -> np.ndarray:
        """Internal ids of raw ids, known items and new items alike (new: ``n_known + k``)."""
        pos = {t: self.n_known + k for k, t in enumerate(self.tokens)}
        known = run.dataset.field2token_id[run.iid_field]
        unknown = [t for t in tokens if t not in pos and known.get(t, 0) == 0]  # id 0: [PAD]
        if unknown:
            raise PluginConfigError(f"--sequence: item id(s) {unknown[:5]} are neither items of the dataset "
                                    f"nor new items")
        return np.asarray([pos[t] if t in pos else known[t] for t in tokens], dtype=np.int64)

    def table(self, run: Any) -> torch.Tensor:
        """``[n_known + M, d]``: the trained item table followed by the new items."""
        with torch.no_grad():
            return torch.cat([run.model.item_table(), self.embeddings.to(run.config["device"])], dim=0)

    def scores(self, run: Any, item_seq: np.ndarray, lengths: np.ndarray, history=None) -> torch.Tensor:
        """``[B, n_known + M]`` scores: the model's user encoder over the extended table (sequences may
        hold new items); on the known items they are ``full_sort_predict``'s."""
        m = run.model
        table = self.table(run)
        seq = torch.as_tensor(item_seq, device=table.device)
        with torch.no_grad():
            out = m.gather_indexes(m.encode_sequence(table[seq], seq), torch.as_tensor(lengths, device=table.device) - 1)
            s = (out @ table.t()).float().cpu()
        s[:, 0] = -np.inf
        if history is not None:
            s[torch.as_tensor(history[0]), torch.as_tensor(history[1])] = -np.inf
        return s


def read_new_items(path: PathLike, known: Any = ()) -> tuple[list[str], dict[str, list[str]]]:
    """``(ids, {column: values})`` of a new-items TSV; one-line errors naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise PluginConfigError(f"--new_items: {p} not found")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PluginConfigError(f"{p}:{line}: expected UTF-8 text, found byte 0x{data[exc.start]:02x}") from None
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    numbered = [(i + 1, r) for i, r in enumerate(rows) if r and any(c.strip() for c in r)]
    if not numbered:
        raise PluginConfigError(f"--new_items: {p} is empty (expected raw_id TAB title [TAB image_path] per line)")
    first = [c.split(":")[0].strip() for c in numbered[0][1]]
    if first[0] in ("item_id", "id", "item") or first[0].endswith("_id"):
        names, numbered = first, numbered[1:]
        names[0] = "item_id"
    else:
        names = ["item_id", "title", "image"][:max(len(r) for _, r in numbered)]
    cols: dict[str, list[str]] = {n: [] for n in names}
    seen: set[str] = set()
    for lineno, row in numbered:
        if len(row) < 2 or len(row) > len(names):
            raise PluginConfigError(f"{p}:{lineno}: expected {len(names)} tab-separated columns "
                                    f"({', '.join(names)}), got {len(row)}")
        row = [c.strip() for c in row] + [""] * (len(names) - len(row))
        tok = row[0]
        if not tok:
            raise PluginConfigError(f"{p}:{lineno}: empty item id")
        if tok in seen:
            raise PluginConfigError(f"{p}:{lineno}: item id {tok!r} is given twice")
        if tok in known:
            raise PluginConfigError(f"{p}:{lineno}: item id {tok!r} is already an item of the dataset")
        seen.add(tok)
        for n, v in zip(names, row):
            cols[n].append(v)
    return cols["item_id"], cols


def _tower_texts(spec: Any, cols: dict[str, list[str]], n: int) -> list[str]:
    fields = [f for f in spec.fields if f in cols]
    if not fields:
        fields = ["title"] if "title" in cols else []
    if not fields:
        raise PluginConfigError(f"--new_items: no column for tower '{spec.name}' (its fields {list(spec.fields)}, "
                                f"or 'title')")
    return [". ".join(v for v in (cols[f][i].strip() for f in fields) if v) for i in range(n)]


def _image_store(config: Any, spec: Any, tokens: list[str], cols: dict[str, list[str]], base: Path) -> Any:
    """A real image store (``data/images``) holding the new items' images."""
    from recbole_iisan.data import images as _img
    from recbole_iisan.data.cache.paths import cache_root

    if "image" not in cols or not any(cols["image"]):
        raise PluginConfigError(f"--new_items: tower '{spec.name}' needs an image path per item (third column)")
    paths = []
    for tok, rel in zip(tokens, cols["image"]):
        path = (base / rel) if rel and not os.path.isabs(rel) else Path(rel)
        if not rel or not path.is_file():
            raise PluginConfigError(f"--new_items: item {tok!r}: image {rel!r} not found")
        paths.append(path.resolve())
    h = hashlib.sha256()
    for tok, path in zip(tokens, paths):
        h.update(tok.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    store_path = cache_root(config) / f"new-images-{h.hexdigest()[:12]}"
    with tempfile.TemporaryDirectory() as tmp:  # <token><ext> links: the layout import_images reads
        for tok, path in zip(tokens, paths):
            os.symlink(path, Path(tmp) / f"{tok}{path.suffix.lower()}")
        _img.import_images(tmp, store_path, item_tokens=tokens, progress=False)
    return _img.ImageStore(store_path)


def standardize_like(states: torch.Tensor, trained: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``model/states.standardize_states`` of new rows with the statistics of the trained items'
    raw rows ``trained`` (row 0 the padding item), in the trained rows' dtype."""
    real = trained[1:].float()
    mean = real.mean(dim=0, keepdim=True)
    std = real.std(dim=0, keepdim=True).clamp_min(eps)
    return ((states.float() - mean) / std).to(trained.dtype)


def new_item_states(run: Any, tokens: list[str], cols: dict[str, list[str]], base: Path) -> dict[str, torch.Tensor]:
    """Per tower, the new items' cached rows ``[M, n_rows, D]`` as the trained model reads them
    (storage dtype, then ``state_norm`` with the trained items' statistics)."""
    from recbole_iisan.data import cache as cache_mod
    config, model = run.config, run.model
    specs = {s.name: s for s in cache_mod.tower_specs_for(config)}
    dtype = getattr(torch, str(config["cache_dtype"]))
    norm = str(config["state_norm"])
    out = {}
    for tower in model.towers:
        spec, layers = specs[tower], list(model.states.layers[tower])
        if spec.is_image:
            folder = cache_mod.ensure_cache(config, spec, layers, tokens,
                                            image_store=_image_store(config, spec, tokens, cols, base))
        else:
            folder = cache_mod.ensure_cache(config, spec, layers, tokens, item_texts=_tower_texts(spec, cols, len(tokens)))
        states, missing = cache_mod.load_states(folder, tokens, layers, dtype=dtype)
        if missing:
            raise PluginConfigError(f"--new_items: tower '{tower}': no state for {[tokens[i] for i in missing][:5]}")
        if norm != "none":
            states = standardize_like(states, run.dataset.item_states[tower])
        out[tower] = states
    return out


def encode_new_items(run: Any, path: PathLike) -> NewItems:
    """Embeddings of the new items of TSV ``path`` from the trained model of ``run`` (a
    :class:`~recbole_iisan.serving.recommend.LoadedRun`), without changing it."""
    model = run.model
    if not (hasattr(model, "side") and hasattr(model, "states") and hasattr(model.states, "layers")
            and hasattr(run.dataset, "item_states")):
        raise PluginConfigError(f"--new_items needs a content model reading cached states (IISANVS, IISANVA); "
                                f"{type(model).__name__} represents items by their training id")
    tokens, cols = read_new_items(path, run.dataset.field2token_id[run.iid_field])
    states = new_item_states(run, tokens, cols, Path(path).resolve().parent)
    h_a, h_b = (states[t].float().to(run.config["device"]) for t in model.towers)
    with torch.no_grad():
        with model._autocast():
            chunks = [model.side(a, b).float() for a, b in
                      zip(h_a.split(model.tower_batch_size), h_b.split(model.tower_batch_size))]
    emb = torch.cat(chunks).cpu()
    if not torch.isfinite(emb).all():
        raise PluginConfigError(f"--new_items: non-finite embeddings for items of {path}")
    field = title_field(run.config, list(cols))
    titles = cols[field] if field else [""] * len(tokens)
    logger.info(f"new items: {len(tokens)} items of {path} embedded ({emb.shape[1]} dims)")
    return NewItems(tokens, list(titles), emb, int(run.n_items))
