"""Top-k recommendations from a trained checkpoint, as raw item ids, titles and scores.

    python run_recbole_iisan.py --recommend=saved/IISANVS-....safetensors --users=196,186 [--topk=10]
    python run_recbole_iisan.py --recommend=saved/IISANVS-....safetensors --sequence="242 302 377"
    python run_recbole_iisan.py --recommend=... --users=196 --new_items=new.tsv   # + unseen items

From Python::

    from recbole_iisan.serving.recommend import recommend
    df = recommend("saved/IISANVS-....safetensors", users=["196"], topk=10)   # pandas DataFrame

The model is rebuilt the way the training run built it (RecBole's ``load_data_and_model`` flow,
through the plugin's pipeline): the config stored in the checkpoint -> ``recbole_iisan.data.utils.prepare_inputs``
(atomic files, encoder caches: reused) -> ``create_dataset`` -> ``data_preparation`` ->
``model_class(config, train_data._dataset)`` -> the checkpoint's parameters.

A user's history is every interaction of the user in the dataset, in time order (the model reads
the last ``MAX_ITEM_LIST_LENGTH``); the scores are the model's ``full_sort_predict`` over every
item, with the padding item and (unless ``exclude_history=False``) the user's history items
removed. Works for the plugin's models and for RecBole's sequential models (SASRec, GRU4Rec...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from recbole_iisan.utils.errors import CheckpointError, PluginConfigError
from recbole_iisan.utils.files import PathLike




@dataclass
class LoadedRun:
    """A trained model with the dataset and split it was trained on."""

    path: str
    config: Any
    dataset: Any  # the whole dataset (every interaction), before the split
    train_data: Any
    valid_data: Any
    test_data: Any
    model: torch.nn.Module
    _titles: Optional[dict] = field(default=None, repr=False)
    _order: Optional[tuple] = field(default=None, repr=False)

    # ------------------------------------------------------------------ ids
    @property
    def uid_field(self) -> str:
        return self.dataset.uid_field

    @property
    def iid_field(self) -> str:
        return self.dataset.iid_field

    @property
    def n_items(self) -> int:
        return int(self.dataset.item_num)

    @property
    def max_len(self) -> int:
        return int(self.config["MAX_ITEM_LIST_LENGTH"])

    def item_tokens(self) -> np.ndarray:
        """Raw item id of every internal id (row 0: ``[PAD]``)."""
        return np.asarray(self.dataset.field2id_token[self.iid_field]).astype(str)

    def item_ids(self, tokens: Sequence[str], what: str = "--sequence") -> np.ndarray:
        known = self.dataset.field2token_id[self.iid_field]
        unknown = [t for t in tokens if known.get(t, 0) == 0]  # id 0 is RecBole's [PAD], no item
        if unknown:
            raise PluginConfigError(f"{what}: item id(s) {unknown[:5]} are not items of dataset "
                                    f"'{self.config['dataset']}' ({self.n_items - 1} items)")
        return np.asarray([known[t] for t in tokens], dtype=np.int64)

    def titles(self) -> dict[str, str]:
        """Raw item id -> title (the first text field of tower A, else a title-like column)."""
        if self._titles is None:
            from recbole_iisan.data.cache.paths import read_item_file
            from recbole_iisan.utils.errors import CacheError

            try:
                names, cols = read_item_file(self.config)
            except CacheError:
                names, cols = [], {}
            from recbole_iisan.serving.new_items import title_field

            field = title_field(self.config, names)
            id_field = self.iid_field if self.iid_field in names else (names[0] if names else "")
            self._titles = ({tok: cols[field][i] for i, tok in enumerate(cols[id_field])}
                            if field and id_field else {})
        return self._titles

    # ------------------------------------------------------------------ histories
    def _sorted_interactions(self) -> tuple[np.ndarray, np.ndarray]:
        """(user ids, item ids) of every interaction, sorted by user then time (file order on ties).

        RecBole's sequential dataset holds its interactions as augmented rows (each interaction but a
        user's first, as a target with the items before it): the first items come back from the rows
        whose input has length 1."""
        if self._order is None:
            feat = self.dataset.inter_feat
            col = lambda f: np.asarray(feat[f].numpy() if hasattr(feat[f], "numpy") else feat[f])  # noqa: E731
            uid, iid = col(self.uid_field), col(self.iid_field)
            tf = self.dataset.time_field
            time = col(tf).astype(np.float64) if tf and tf in feat else np.zeros(len(uid))
            first = np.zeros(len(uid), dtype=bool)
            seq_f = self.iid_field + self.config["LIST_SUFFIX"]
            len_f = self.config["ITEM_LIST_LENGTH_FIELD"]
            if seq_f in feat and len_f in feat:  # augmented rows: add each user's first item
                starts = col(len_f) == 1
                uid = np.concatenate([col(self.uid_field)[starts], uid])
                iid = np.concatenate([col(seq_f)[starts, 0], iid])
                time = np.concatenate([np.full(int(starts.sum()), -np.inf), time])
                first = np.concatenate([np.ones(int(starts.sum()), dtype=bool), first])
            order = np.lexsort((np.arange(len(uid)), time, ~first, uid))
            self._order = (uid[order], iid[order])
        return self._order

    def user_histories(self, users: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(item_seq [B, L], lengths [B], history (rows, items))`` of raw user ids: the model's input
        (the last ``L`` items, left-aligned and zero-padded as RecBole does) and every history item."""
        known = self.dataset.field2token_id[self.uid_field]
        unknown = [u for u in users if u not in known]
        if unknown:
            raise PluginConfigError(f"--users: user id(s) {unknown[:5]} are not users of dataset "
                                    f"'{self.config['dataset']}' (after its filtering)")
        uids = np.asarray([known[u] for u in users], dtype=np.int64)
        s_uid, s_iid = self._sorted_interactions()
        starts = np.searchsorted(s_uid, uids, "left")
        ends = np.searchsorted(s_uid, uids, "right")
        counts = ends - starts
        if (counts == 0).any():
            raise PluginConfigError(f"--users: user(s) {[u for u, c in zip(users, counts) if c == 0][:5]} "
                                    f"have no interactions")
        return self._padded_inputs(s_iid, starts, ends)

    def _padded_inputs(self, flat: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        L = self.max_len
        counts = ends - starts
        lengths = np.minimum(counts, L)
        first = ends - lengths
        pos = np.arange(L)[None, :]
        idx = np.minimum(first[:, None] + pos, len(flat) - 1)
        seq = np.where(pos < lengths[:, None], flat[idx], 0)
        rows = np.repeat(np.arange(len(starts)), counts)
        items = flat[np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)]
        return seq.astype(np.int64), lengths.astype(np.int64), (rows, items)

    def sequence_inputs(self, sequences: Sequence[Sequence[int]]):
        """``(item_seq, lengths, history)`` of given internal-id sequences (oldest first)."""
        counts = np.asarray([len(s) for s in sequences], dtype=np.int64)
        if (counts == 0).any():
            raise PluginConfigError("--sequence: an empty sequence (give at least one item id)")
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
        ends = np.cumsum(counts)
        return self._padded_inputs(flat, ends - counts, ends)

    # ------------------------------------------------------------------ scores
    def interaction(self, item_seq: np.ndarray, lengths: np.ndarray):
        from recbole.data.interaction import Interaction

        m = self.model
        return Interaction({m.ITEM_SEQ: torch.as_tensor(item_seq), m.ITEM_SEQ_LEN: torch.as_tensor(lengths)}).to(
            self.config["device"])

    def scores(self, item_seq: np.ndarray, lengths: np.ndarray, history=None) -> torch.Tensor:
        """``[B, n_items]`` ``full_sort_predict`` scores; padding item and ``history`` at -inf."""
        with torch.no_grad():
            s = self.model.full_sort_predict(self.interaction(item_seq, lengths)).view(len(lengths), -1).float().cpu()
        s[:, 0] = -np.inf
        if history is not None:
            s[torch.as_tensor(history[0]), torch.as_tensor(history[1])] = -np.inf
        return s


_LOADED: dict[tuple, LoadedRun] = {}


def check_given(stored: dict, path: PathLike, model: Optional[str] = None, dataset: Optional[str] = None) -> None:
    """A ``--model`` / ``--dataset`` that contradicts the checkpoint: one line."""
    if dataset is not None and str(dataset) != str(stored.get("dataset")):
        raise CheckpointError(f"checkpoint {path}: the checkpoint was trained on {stored.get('dataset')}; drop "
                              f"--dataset or pass a checkpoint of {dataset}")
    if model is not None and str(model).lower() != str(stored.get("model")).lower():
        raise CheckpointError(f"checkpoint {path}: the checkpoint holds a {stored.get('model')} model; drop "
                              f"--model or pass a checkpoint of {model}")


def rebuild_config(ck: dict, path: PathLike, device: Optional[str] = None, config_files=None,
                   config_dict: Optional[dict] = None, overrides: Optional[dict] = None, trust: bool = False):
    """The RecBole Config of a checkpoint's run (``config.config_from_stored``), for this process."""
    from recbole_iisan.config.configurator import config_from_stored

    stored = ck.get("config")
    if not isinstance(stored, dict) or not stored.get("model") or not stored.get("dataset"):
        raise CheckpointError(f"checkpoint {path}: holds no RecBole config (not saved by a training run)")
    runtime = {"show_progress": False, "trust_checkpoint": bool(trust)}
    config = config_from_stored(stored, config_files, {**dict(config_dict or {}), **runtime}, overrides)
    config["device"] = torch.device(device or "cpu")
    return config


def load_run(path: PathLike, device: Optional[str] = None, overrides: Optional[dict] = None, config_files=None,
             config_dict: Optional[dict] = None, model: Optional[str] = None, dataset: Optional[str] = None,
             trust: bool = False) -> LoadedRun:
    """The trained model of checkpoint ``path`` with its dataset and split (see the module doc).
    ``config_files``, ``config_dict`` and ``overrides`` (the command line's ``--key=value``) are
    applied over the checkpoint's settings as at training (``--data_path`` is the parent folder);
    ``model`` / ``dataset``, when given, must be the checkpoint's; ``trust`` lets a legacy pickle
    checkpoint run its code (``--trust_checkpoint``)."""
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_iisan.config.configurator import get_model_class
    from recbole_iisan.data.utils import create_dataset, prepare_inputs
    from recbole_iisan.trainer import checkpoint

    key = (str(Path(path).resolve()), device, repr(sorted((overrides or {}).items())), repr(config_files),
           repr(sorted((config_dict or {}).items())), model, dataset, trust)
    if key in _LOADED:
        return _LOADED[key]
    ck = checkpoint.load(path, map_location="cpu", trust=trust)
    check_given(ck.get("config") or {}, path, model, dataset)
    config = rebuild_config(ck, path, device, config_files, config_dict, overrides, trust)
    init_seed(config["seed"], config["reproducibility"])
    model_class = get_model_class(config["model"])
    prepare_inputs(config, model_class)
    ds = create_dataset(config, model_class)
    from recbole_iisan.evaluator.cold_start import apply as cold_start

    ds = cold_start(config, ds)
    train_data, valid_data, test_data = data_preparation(config, ds)
    net = model_class(config, train_data._dataset).to(config["device"])
    checkpoint.load_model_state(net, ck, path)
    net.eval()
    run = LoadedRun(str(path), config, ds, train_data, valid_data, test_data, net)
    _LOADED[key] = run
    return run


def _frame(run: LoadedRun, labels: Sequence[str], scores: torch.Tensor, topk: int,
           tokens: np.ndarray, titles: dict) -> "Any":
    import pandas as pd

    k = min(int(topk), int(torch.isfinite(scores).sum(dim=1).min().item()))
    if k < 1:
        raise PluginConfigError("nothing to recommend: every item is in the history")
    top_s, top_i = torch.topk(scores, k, dim=1)
    top_i = top_i.numpy()
    raw = tokens[top_i]
    return pd.DataFrame({
        "user": np.repeat(np.asarray(labels, dtype=object), k),
        "rank": np.tile(np.arange(1, k + 1), len(labels)),
        "item_id": raw.reshape(-1),
        "title": [titles.get(t, "") for t in raw.reshape(-1)],
        "score": top_s.numpy().reshape(-1).astype(np.float64),
    })


def recommend(checkpoint_path: Union[PathLike, LoadedRun], users: Optional[Sequence[str]] = None,
              sequences: Optional[Sequence[Sequence[str]]] = None, topk: int = 10, exclude_history: bool = True,
              new_items: Optional[PathLike] = None, device: Optional[str] = None,
              overrides: Optional[dict] = None):
    """Top-``topk`` items per user (raw user ids ``users``) or per raw-id sequence (``sequences``,
    oldest first), as a DataFrame ``user, rank, item_id, title, score`` (``user`` is the user id, or
    ``seq<k>`` for the k-th sequence). ``new_items``: a TSV of unseen items ranked with the known
    ones (content models only, see :mod:`recbole_iisan.serving.new_items`)."""
    run = checkpoint_path if isinstance(checkpoint_path, LoadedRun) else load_run(checkpoint_path, device, overrides)
    if not users and not sequences:
        raise PluginConfigError("--recommend needs --users=U1,U2 or --sequence=\"i1 i2 ...\"")
    new = None
    if new_items is not None:
        from recbole_iisan.serving.new_items import encode_new_items

        new = encode_new_items(run, new_items)
    labels: list[str] = []
    parts = []
    if users:
        users = [str(u) for u in users]
        parts.append(run.user_histories(users))
        labels += users
    if sequences:
        if new is not None:
            ids = [new.item_ids(run, [str(t) for t in s]) for s in sequences]
        else:
            ids = [run.item_ids([str(t) for t in s]) for s in sequences]
        parts.append(run.sequence_inputs(ids))
        labels += [f"seq{k + 1}" for k in range(len(sequences))]
    seq = np.concatenate([p[0] for p in parts])
    lengths = np.concatenate([p[1] for p in parts])
    offsets = np.cumsum([0] + [len(p[1]) for p in parts])
    rows = np.concatenate([p[2][0] + off for p, off in zip(parts, offsets)])
    items = np.concatenate([p[2][1] for p in parts])
    history = (rows, items) if exclude_history else None
    tokens = run.item_tokens()
    titles = run.titles()
    if new is None:
        scores = run.scores(seq, lengths, history)
    else:
        scores = new.scores(run, seq, lengths, history)
        tokens = np.concatenate([tokens, np.asarray(new.tokens, dtype=str)])
        titles = {**titles, **dict(zip(new.tokens, new.titles))}
    return _frame(run, labels, scores, topk, tokens, titles)


def format_frame(df) -> str:
    """The CLI's printout: one block per user."""
    out = []
    for user, g in df.groupby("user", sort=False):
        out.append(f"user {user}:")
        body = g[["rank", "item_id", "score", "title"]].to_string(index=False, float_format=lambda x: f"{x:.4f}")
        out += ["  " + line for line in body.splitlines()]
    return "\n".join(out)


def breakdown_of(run: LoadedRun) -> dict:
    """The test breakdown (``recbole_iisan.evaluator.breakdown``) of a loaded model, as a training run writes it."""
    from recbole_iisan.evaluator.breakdown import compute
    from recbole_iisan.trainer.trainer import PluginTrainer

    return compute(PluginTrainer(run.config, run.model), run.train_data, run.test_data)


def format_breakdown(run: LoadedRun) -> str:
    from recbole_iisan.evaluator.breakdown import markdown

    bd = breakdown_of(run)
    metric = f"{str(run.config['metrics'][0]).lower()}@{max(run.config['topk'])}"
    overall = ", ".join(f"{k} {v:.4f}" for k, v in bd["overall"].items() if k != "n")
    return (f"{run.config['model']} on {run.config['dataset']}, test split ({bd['overall']['n']} users): {overall}\n\n"
            + markdown([{"model": run.config["model"], "breakdown": bd}], metric))


def main(args: Any, overrides: dict, config_files: Optional[list] = None, config_dict: Optional[dict] = None,
         given: Optional[dict] = None) -> int:
    """``--recommend=CKPT`` (and ``--export=DIR``) from the command line: the training flags
    (``--config_files``, ``--key=value``) apply over the checkpoint's settings; ``given`` holds the
    ``--model`` / ``--dataset`` the user typed (each must be the checkpoint's)."""
    given = dict(given or {})
    if not args.recommend:
        raise PluginConfigError("--export needs the checkpoint to export: --recommend=saved/MODEL-....safetensors --export=DIR")
    overrides = dict(overrides or {})
    topk = overrides.pop("topk", 10)
    topk = max(topk) if isinstance(topk, (list, tuple)) else topk
    if not isinstance(topk, int) or topk < 1:
        raise PluginConfigError(f"--topk: expected a positive integer, got {topk!r}")
    users = list(dict.fromkeys(u.strip() for u in (args.users or "").split(",") if u.strip()))  # once each
    sequences = [s.split() for s in (args.sequence or [])]
    run = load_run(args.recommend, overrides=overrides or None, config_files=config_files, config_dict=config_dict,
                   model=given.get("model"), dataset=given.get("dataset"), trust=bool(args.trust_checkpoint))
    if getattr(args, "breakdown", False):
        print(format_breakdown(run))
        if not users and not sequences and not args.export:
            return 0
    if args.export:
        from recbole_iisan.serving.export import export

        written = export(run, args.export, new_items=args.new_items)
        print(f"exported {run.config['model']} to {args.export}: " + ", ".join(sorted(written)))
        if not users and not sequences:
            return 0
    df = recommend(run, users=users or None, sequences=sequences or None, topk=topk,
                   exclude_history=not args.include_history, new_items=args.new_items)
    print(format_frame(df))
    if args.recommend_file:
        from recbole_iisan.utils.files import atomic_write_text

        atomic_write_text(args.recommend_file, df.to_csv(sep="\t", index=False))
        print(f"written to {args.recommend_file}")
    return 0
