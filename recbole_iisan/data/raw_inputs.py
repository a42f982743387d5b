"""Raw item inputs for the end-to-end baselines (backbones inside the training step).

:class:`RawInputSequentialDataset` is the plugin's :class:`ProtocolSequentialDataset` plus, per
tower, the item's *model inputs* in RecBole's internal item-id order (row 0 = the padding item):

- text towers: ``input_ids`` / ``attention_mask`` ``[n_items, T]`` int64, tokenised once with the
  tower's tokenizer (specials included, truncated to ``<t>_max_length``, right-padded to the
  longest item, T <= max_length). The text is the tower's fields joined by ". " as the cache does.
  Row 0 (padding) is one special token.
- the image tower: ``pixels`` ``[n_items, 3, H, W]`` uint8 (resized to the encoder's input size,
  e.g. 224x224, with its processor's resampling; no crop), plus ``mean`` / ``std`` ``[3]`` and
  ``rescale`` (the processor's, or 0.5/0.5 for the paper's transform), so that the model
  normalises on the fly: ``(pixels * rescale - mean) / std``. Items without an image
  (``missing_image: zeros``) and row 0 are black images. Keeping uint8 makes ml-100k's 1,682
  posters 253 MB instead of 1 GB.

The decoded pixels are saved once as ``.npy`` next to the encoder caches (``cache_root``) and
reused when the item set, the image store and the size are the same.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recbole_iisan.data.dataset import ProtocolSequentialDataset
from recbole_iisan.data.images import check_missing_images
from recbole_iisan.utils.files import atomic_write_bytes
from recbole_iisan.towers.encoders import load_image_processor, load_tokenizer, pad_id_of, pad_ids, tokenize

logger = logging.getLogger()

DEFAULT_IMAGE_SIZE = 224


def _image_size(processor: Any) -> tuple[int, int]:
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    if getattr(processor, "do_center_crop", False) and crop:
        size = crop
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        s = int(size["shortest_edge"])
        return s, s
    return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE


def image_normalisation(processor: Any) -> tuple[list[float], list[float], float, tuple[int, int], int]:
    """``(mean, std, rescale, (H, W), PIL resample)`` of an image processor (None: the paper's
    transform: 224x224 bilinear, mean = std = 0.5)."""
    if processor is None:
        return [0.5] * 3, [0.5] * 3, 1 / 255.0, (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE), 2
    mean = list(getattr(processor, "image_mean", None) or [0.5] * 3)
    std = list(getattr(processor, "image_std", None) or [0.5] * 3)
    rescale = float(getattr(processor, "rescale_factor", 1 / 255.0)) if getattr(processor, "do_rescale", True) else 1.0
    resample = getattr(processor, "resample", 2)
    resample = int(getattr(resample, "value", resample) if resample is not None else 2)
    return mean, std, rescale, _image_size(processor), resample


def decode_images(store: Any, tokens: list[str], size: tuple[int, int], resample: int) -> tuple[np.ndarray, int]:
    """uint8 ``[len(tokens), 3, H, W]``; absent tokens are black. Returns (pixels, n missing)."""
    h, w = size
    out = np.zeros((len(tokens), 3, h, w), dtype=np.uint8)
    missing = 0
    for i, tok in enumerate(tokens):
        if tok not in store:
            missing += 1
            continue
        img = store.get_image(tok).convert("RGB").resize((w, h), resample=resample)
        out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return out, missing


class RawInputSequentialDataset(ProtocolSequentialDataset):
    """A sequential dataset serving each item's raw model inputs per tower.

    Attributes:
        towers: the two tower names (tower A first).
        tower_specs: tower -> ``TowerSpec``.
        item_inputs: tower -> {``input_ids``, ``attention_mask``} (text) or {``pixels``,
            ``mean``, ``std``, ``rescale``} (image); first dimension ``n_items`` (row 0 = padding).
        missing_items: tower -> number of items without an input (black images).
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._load_raw_inputs()

    def _load_raw_inputs(self) -> None:
        from recbole_iisan.data.cache.paths import item_id_field, read_item_file, tower_specs_for

        names, cols = read_item_file(self.config)
        specs = tower_specs_for(self.config)
        id_field = item_id_field(self.config, names)
        file_tokens = cols[id_field]
        row_of = {t: i for i, t in enumerate(file_tokens)}
        tokens = [str(t) for t in self.field2id_token[self.iid_field][1:]]  # internal ids 1..n-1
        self.towers = [s.name for s in specs]
        self.tower_specs = {s.name: s for s in specs}
        self.item_inputs: dict[str, dict[str, torch.Tensor]] = {}
        self.missing_items: dict[str, int] = {}
        for spec in specs:
            if spec.is_image:
                self.item_inputs[spec.name] = self._image_inputs(spec, tokens)
            else:
                texts = []
                absent = 0
                for t in tokens:
                    i = row_of.get(t)
                    if i is None:
                        absent += 1
                        texts.append("")
                        continue
                    texts.append(". ".join(v for v in (cols[f][i].strip() for f in spec.fields) if v))
                tok = load_tokenizer(spec.encoder, spec.name)
                ids, mask = pad_ids(tokenize(tok, [""] + texts, int(spec.max_length)), pad_id_of(tok))
                self.item_inputs[spec.name] = {"input_ids": ids, "attention_mask": mask}
                self.missing_items[spec.name] = absent
                logger.info(f"tower '{spec.name}': tokenised {len(texts)} item texts to {tuple(ids.shape)}")

    def _image_inputs(self, spec: Any, tokens: list[str]) -> dict[str, torch.Tensor]:
        from recbole_iisan.data.cache.identity import store_path
        from recbole_iisan.data.cache.paths import cache_root, find_image_store

        processor = load_image_processor(spec.encoder)
        mean, std, rescale, size, resample = image_normalisation(processor)
        store = find_image_store(self.config, tokens, spec.name)
        have = [t for t in tokens if t in store]
        missing = len(tokens) - len(have)
        check_missing_images(self.config, spec.name, [t for t in tokens if t not in store], len(tokens), "black images")
        digest = hashlib.sha256(
            (store_path(store) + "\0" + "\0".join(tokens) + "\0" + "\0".join(have)
             + f"\0{size}\0{resample}").encode()
        ).hexdigest()[:16]
        npy = None
        try:
            npy = Path(cache_root(self.config)) / f"raw-{spec.name}-{size[0]}x{size[1]}-{digest}.npy"
        except Exception:  # noqa: BLE001 - no writable cache folder: decode every time
            npy = None
        if npy is not None and npy.is_file():
            pixels = np.load(npy)
            logger.info(f"tower '{spec.name}': decoded pixels reused from {npy}")
        else:
            pixels, _ = decode_images(store, tokens, size, resample)
            pixels = np.concatenate([np.zeros((1,) + pixels.shape[1:], np.uint8), pixels])
            if npy is not None:
                buf = io.BytesIO()
                np.save(buf, pixels)
                atomic_write_bytes(npy, buf.getvalue())
        self.missing_items[spec.name] = missing
        logger.info(f"tower '{spec.name}': pixels {tuple(pixels.shape)} uint8 "
                    f"({pixels.nbytes / 2**20:.0f} MB), mean {mean}, std {std}")
        return {
            "pixels": torch.from_numpy(pixels),
            "mean": torch.tensor(mean, dtype=torch.float32),
            "std": torch.tensor(std, dtype=torch.float32),
            "rescale": torch.tensor(rescale, dtype=torch.float32),
        }
