"""Export a trained model for serving: item table, TorchScript user encoder, exact top-k index.

    python run_recbole_iisan.py --recommend=saved/IISANVS-....safetensors --export=DIR [--new_items=new.tsv]

writes into ``DIR``:

- ``item_embeddings.npy``: float32 ``[n_items, d]``; row ``i`` is RecBole's internal item id ``i``
  (row 0 the padding item, never recommended). With ``--new_items`` the new items follow.
- ``item_ids.tsv``: ``index TAB item_id TAB title``, one line per row of the table.
- ``user_encoder.pt``: TorchScript; ``encoder(item_seq [B, L] int64, lengths [B] int64) -> [B, d]``.
  ``item_seq`` holds internal ids (rows of the table), oldest first, left-aligned, zero-padded,
  at most ``max_seq_length`` long (the last items of a longer history). For the plugin's models
  the module holds the item table as a buffer (items are content: no id embedding to ship).
- ``export.json``: model, dataset, dims, ``max_seq_length``, how the encoder was compiled.

Scores are inner products: ``encoder(seq, len) @ table.T`` equals the model's
``full_sort_predict`` (checked on export). The exact top-k (see :func:`topk_from_export`, and the
README snippet)::

    import numpy as np, torch
    table = np.load("DIR/item_embeddings.npy")
    ids = [line.split("\\t")[1] for line in open("DIR/item_ids.tsv").read().splitlines()[1:]]
    enc = torch.jit.load("DIR/user_encoder.pt")
    u = enc(torch.tensor([[12, 7, 3, 0, 0]]), torch.tensor([3])).numpy()      # [1, d]
    s = u @ table.T; s[:, 0] = -np.inf; s[:, [12, 7, 3]] = -np.inf              # pad + history
    top = np.argpartition(-s, 10, axis=1)[:, :10]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), 1), 1)
    print([ids[i] for i in top[0]])
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from recbole_iisan.utils.errors import PluginConfigError
from recbole_iisan.utils.files import PathLike, atomic_write_bytes, atomic_write_json, atomic_write_text

logger = logging.getLogger()


class ContentUserEncoder(nn.Module):
    """The plugin's user encoder (``SideNetworkRecommender.encode_sequence`` + last position) with the
    item table as a buffer: what a serving process needs, without the side network or caches."""

    def __init__(self, model: nn.Module, table: torch.Tensor):
        super().__init__()
        import copy

        self.register_buffer("item_table", table.detach().float().clone())
        self.position_embedding = copy.deepcopy(model.position_embedding)
        self.layer_norm = copy.deepcopy(model.LayerNorm)
        self.trm_encoder = copy.deepcopy(model.trm_encoder)
        self.requires_grad_(False)
        self.eval()

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        emb = self.item_table[item_seq]
        position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
        x = self.layer_norm(emb + self.position_embedding(position_ids).unsqueeze(0))
        # SequentialRecommender.get_attention_mask (causal, padding keys masked)
        mask = (item_seq != 0).unsqueeze(1).unsqueeze(2)
        mask = torch.tril(mask.expand(-1, -1, item_seq.size(-1), -1))
        mask = torch.where(mask, 0.0, -10000.0)
        out = self.trm_encoder(x, mask, output_all_encoded_layers=True)[-1]
        idx = (item_seq_len - 1).view(-1, 1, 1).expand(-1, -1, out.size(-1))
        return out.gather(1, idx).squeeze(1)


class ForwardUserEncoder(nn.Module):
    """RecBole's own models (SASRec, GRU4Rec...): their ``forward(item_seq, item_seq_len)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        import copy

        self.model = copy.deepcopy(model)
        self.requires_grad_(False)
        self.eval()

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        return self.model(item_seq, item_seq_len)


def item_table(model: nn.Module) -> torch.Tensor:
    """``[n_items, d]`` float32 item table of a trained model."""
    with torch.no_grad():
        if hasattr(model, "item_table"):
            return model.item_table().detach().float().cpu()
        if hasattr(model, "item_embedding"):
            return model.item_embedding.weight.detach().float().cpu()
    raise PluginConfigError(f"--export: {type(model).__name__} has no item table (item_table() or item_embedding)")


def _compile(module: nn.Module, example: tuple) -> tuple[Any, str]:
    """TorchScript by scripting, else by tracing (RecBole's TransformerEncoder builds Python lists)."""
    module.eval()
    try:
        return torch.jit.script(module), "script"
    except Exception as exc:  # noqa: BLE001  (torch raises many kinds; tracing is the fallback)
        logger.info(f"torch.jit.script failed ({type(exc).__name__}); tracing instead")
    with torch.no_grad():
        return torch.jit.trace(module, example, check_trace=False), "trace"


def _example(run: Any, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of real test inputs (varied lengths) for tracing and the export check."""
    inter = next(iter(run.test_data))[0]
    m = run.model
    return inter[m.ITEM_SEQ][:n].cpu(), inter[m.ITEM_SEQ_LEN][:n].cpu()


def build_user_encoder(run: Any, table: torch.Tensor) -> tuple[Any, str]:
    model = run.model.cpu().eval()
    if hasattr(model, "encode_sequence") and hasattr(model, "trm_encoder"):
        module = ContentUserEncoder(model, table)
    elif hasattr(model, "item_embedding"):
        module = ForwardUserEncoder(model)
    else:
        raise PluginConfigError(f"--export: no user encoder to export for {type(model).__name__}")
    return _compile(module, _example(run))


def export(run: Any, out_dir: PathLike, new_items: Optional[PathLike] = None) -> list[str]:
    """Write the export files (module doc) for a :class:`~recbole_iisan.serving.recommend.LoadedRun`;
    returns their names. Checks that the exported parts reproduce ``full_sort_predict``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run.config["device"] = torch.device("cpu")
    model = run.model.cpu().eval()
    table = item_table(model)
    tokens = list(run.item_tokens())
    titles = run.titles()
    names = [titles.get(t, "") for t in tokens]
    if new_items is not None:
        from recbole_iisan.serving.new_items import encode_new_items

        new = encode_new_items(run, new_items)
        table = torch.cat([table, new.embeddings.float()])
        tokens += list(new.tokens)
        names += list(new.titles)
    encoder, how = build_user_encoder(run, table)

    # the check: exported encoder + table == the model's full_sort_predict on real test inputs
    seq, lengths = _example(run)
    with torch.no_grad():
        ref = run.model.full_sort_predict(run.interaction(seq.numpy(), lengths.numpy())).float().cpu()
        got = encoder(seq, lengths) @ table[: ref.size(1)].t()
    if not torch.allclose(got, ref, atol=1e-4, rtol=1e-4):
        raise PluginConfigError(f"--export: the exported encoder does not reproduce {type(model).__name__}."
                                f"full_sort_predict (max diff {float((got - ref).abs().max()):.3g}); not exported")

    buf = io.BytesIO()
    np.save(buf, table.numpy().astype(np.float32))
    atomic_write_bytes(out / "item_embeddings.npy", buf.getvalue())
    clean = [n.replace("\t", " ").replace("\n", " ") for n in names]
    atomic_write_text(out / "item_ids.tsv", "index\titem_id\ttitle\n"
                      + "".join(f"{i}\t{t}\t{n}\n" for i, (t, n) in enumerate(zip(tokens, clean))))
    buf = io.BytesIO()
    torch.jit.save(encoder, buf)
    atomic_write_bytes(out / "user_encoder.pt", buf.getvalue())
    atomic_write_json(out / "export.json", {
        "model": str(run.config["model"]), "dataset": str(run.config["dataset"]), "checkpoint": str(run.path),
        "n_items": int(table.size(0)), "n_known_items": int(run.n_items), "dim": int(table.size(1)),
        "max_seq_length": int(run.max_len), "torchscript": how, "padding_row": 0,
        "scores": "inner product of encoder(item_seq, lengths) and item_embeddings rows",
    })
    logger.info(f"exported {table.size(0)} items x {table.size(1)} and the user encoder ({how}) to {out}")
    return ["item_embeddings.npy", "item_ids.tsv", "user_encoder.pt", "export.json"]


def load_export(out_dir: PathLike) -> tuple[np.ndarray, list[str], Any]:
    """``(table, raw ids, TorchScript encoder)`` of an export folder."""
    out = Path(out_dir)
    table = np.load(out / "item_embeddings.npy")
    ids = [line.split("\t")[1] for line in (out / "item_ids.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    return table, ids, torch.jit.load(str(out / "user_encoder.pt"))


def topk_from_export(out_dir: PathLike, item_seq: np.ndarray, lengths: np.ndarray, k: int = 10,
                     history: Optional[tuple] = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` from an export folder (numpy ``argpartition`` over the whole
    table): ``(row indices [B, k], scores [B, k])``. ``history = (rows, items)`` index arrays of
    entries to exclude (the padding row 0 always is)."""
    table, _, enc = load_export(out_dir)
    with torch.no_grad():
        u = enc(torch.as_tensor(item_seq), torch.as_tensor(lengths)).numpy().astype(np.float32)
    s = u @ table.T
    s[:, 0] = -np.inf
    if history is not None:
        s[np.asarray(history[0]), np.asarray(history[1])] = -np.inf
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, 1)
    return top, np.take_along_axis(s, top, 1)
