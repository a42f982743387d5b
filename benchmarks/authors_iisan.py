"""The authors' cached IISAN (github.com/GAIR-Lab/IISAN, ``Code_Cached``), imported from a folder
outside this repository, for side-by-side timings (``benchmarks/step_speed.py --authors_code DIR``).

``DIR/Code_Cached/model/{model,modules,encoders}.py`` are the authors' files, unmodified; nothing
of theirs is in this repository. What this module adds to import and run them standalone:

- ``args``: an ``argparse.Namespace`` holding the values of ``Code_Cached/parameters.py``'s defaults
  and ``Code_Cached/scripts/run_IISAN.py`` (BERT-base + ViT-base: 768 wide, 13 hidden states,
  ``side_adapter_*_list 1,3,5,7,9,11`` -> 7 SANBs per tower, ``modality intra_inter``, gated fusion,
  bottleneck 64, embedding 64, 2 blocks x 2 heads, ``max_seq_len 10``);
- the backbones ``run.py`` loads (``ViTForImageClassification``, ``BertModel``) are never called in
  cached mode: ``IISANAdaptedMModel`` only takes the ViT's ``classifier`` (replaced by ``run.py`` with
  ``Linear(768, embedding_dim)``, Xavier-normal weight, zero bias) and the text encoder's ``fc``. The
  stub is a module holding that ``classifier`` (initialised as ``run.py`` does) and ``bert_model=None``;
- the model is built as ``run.py`` builds it: ``ModelMM(args, item_num, True, cv_model, bert_model,
  pop_prob_list)``, then ``model.mm_encoder = IISANAdaptedMModel(model.mm_encoder, args)``
  (``add_interIISAN_adapter_to_model``); every parameter trains (``run.py``'s ``requires_grad`` rules
  for ``fine_tune_to None`` + ``adapter_type IISAN`` leave all of them trainable);
- the evaluation's compute of ``data_utils/metrics.py`` (``get_MM_item_embeddings`` + ``eval_model``)
  is mirrored in :func:`authors_item_table` / :func:`authors_scores` on in-memory tensors instead of
  their ``DataLoader`` over per-item ``.pt`` files (the same module calls, chunk sizes and list
  ``extend`` + ``stack``); their per-user metric loop (an ``argsort`` of every item per user) is left out.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

ARGS = dict(max_seq_len=10, l2_weight=0.0, embedding_dim=64, num_attention_heads=2, drop_rate=0.1,
            transformer_block=2, modality="intra_inter", word_embedding_dim=768, num_words_title=30,
            num_words_abstract=50, num_words_body=50, news_attributes=["title"], bert_adapter_down_size=64,
            cv_adapter_down_size=64, adapter_dropout_rate=0.1, adapter_activation="RELU",
            side_adapter_vit_list="1,3,5,7,9,11", side_adapter_bert_list="1,3,5,7,9,11", remove_first="None",
            fusion_method="gated", bert_model_load="bert_base_uncased")
N_STATES, WIDTH, ITEM_TEST_BATCH = 13, 768, 256  # hidden states per item, their width, run_eval's batch


def find(authors_code: Optional[str]) -> Optional[Path]:
    """``DIR`` when ``DIR/Code_Cached/model/model.py`` exists, else None."""
    if not authors_code:
        return None
    root = Path(authors_code).expanduser()
    return root if (root / "Code_Cached" / "model" / "model.py").is_file() else None


def load(root: Path, item_num: int, pop_prob_list) -> nn.Module:
    """The authors' ``ModelMM`` with ``IISANAdaptedMModel`` as its item encoder (see the module doc)."""
    sys.path.insert(0, str(root / "Code_Cached"))
    try:
        mod = importlib.import_module("model.model")
    finally:
        sys.path.pop(0)
    args = argparse.Namespace(**ARGS)

    class CvStub(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(WIDTH, args.embedding_dim)
            nn.init.xavier_normal_(self.classifier.weight.data)
            nn.init.constant_(self.classifier.bias.data, 0)

    model = mod.ModelMM(args, item_num, True, CvStub(), None, pop_prob_list)
    model.mm_encoder = mod.IISANAdaptedMModel(model.mm_encoder, args)
    return model


def train_step(model: nn.Module, ids: torch.Tensor, images: torch.Tensor, texts: torch.Tensor,
               log_mask: torch.Tensor, optimizer=None) -> torch.Tensor:
    """``run.py``'s step (CPU, fp32: ``torch.cuda.amp`` is off): ``ids [B*(L+1)]``, states
    ``[B, L+1, 13, 768]`` (pads: zeros), ``log_mask [B, L]`` (1 for real input positions)."""
    if optimizer is not None:
        optimizer.zero_grad()
    else:
        model.zero_grad()
    loss = model(ids, images, texts, log_mask, torch.device("cpu"))
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss


@torch.no_grad()
def authors_item_table(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> list[torch.Tensor]:
    """``get_MM_item_embeddings`` on in-memory states ``[n_items + 1, 13, 768]``: the three parts
    (image, text, inter) of every item, ``ITEM_TEST_BATCH`` items per ``mm_encoder`` call."""
    model.eval()
    cv, text, inter = [], [], []
    for s in range(0, images.size(0), ITEM_TEST_BATCH):
        e_cv, e_texts = model.mm_encoder(images[s:s + ITEM_TEST_BATCH], texts[s:s + ITEM_TEST_BATCH])
        cv.extend(e_cv.detach())
        text.extend(e_texts[0].detach())
        inter.extend(e_texts[1].detach())
    return [torch.stack(cv, dim=0), torch.stack(text, dim=0), torch.stack(inter, dim=0)]


@torch.no_grad()
def authors_scores(model: nn.Module, parts: list[torch.Tensor], windows: torch.Tensor,
                   log_mask: torch.Tensor, batch: int = ITEM_TEST_BATCH) -> list[torch.Tensor]:
    """``eval_model``'s scores: ``com_dense`` over the parts, each user's left-padded window
    (``windows [U, L]``) through the user encoder, ``prec_emb @ item_embeddings.T``."""
    image, text, inter = parts
    items = model.com_dense(torch.cat([image, text, inter], dim=1))
    out = []
    for s in range(0, windows.size(0), batch):
        w, mask = windows[s:s + batch], log_mask[s:s + batch]
        score_embs = model.com_dense(torch.cat([image[w], text[w], inter[w]], dim=2))
        prec_emb = model.user_encoder(score_embs, mask, torch.device("cpu"))[:, -1].detach()
        out.append(torch.matmul(prec_emb, items.t()).squeeze(dim=-1).detach())
    return out
