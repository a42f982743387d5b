"""Raw item inputs for the end-to-end baselines (backbones inside the training step).

:class:`RawInputSequentialDataset` is the plugin's :class:`ProtocolSequentialDataset` plus, per
tower, the item's *model inputs* in RecBole's internal item-id order (row 0 = the padding item):

- text towers: ``input_ids`` / ``attention_mask`` ``[n_items, T]`` int64, tokenised once with the
  tower's tokenizer (specials included, truncated to ``<t>_max_length``, right-padded to the
  longest item, T <= max_length). The text is the tower's fields joined by ". " as the cache does.
  Row 0 (padding) is one special token.
- the image tower: ``pixels`` ``[n_items, 3, H, W]`` uint8, decoded, resized and cropped by the
  tower's image transform (``towers/image_transform.py``, ``ImageTransform.resized``: the same
  decode and processor as the cache builder, by ``image_backend``), plus ``mean`` / ``std``
  ``[3]`` and ``rescale`` (the processor's, or 0.5/0.5 for the paper's transform), so that the
  model normalises on the fly: ``(pixels * rescale - mean) / std``, which is what the cache
  builder's transform computes. Items without an image (``missing_image: zeros``) and row 0 are
  black images. Keeping uint8 makes ml-100k's 1,682 posters 253 MB instead of 1 GB.

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
from recbole_iisan.utils.errors import EncoderLoadError
from recbole_iisan.utils.files import atomic_write_bytes
from recbole_iisan.towers.encoders import load_image_processor, load_tokenizer, pad_id_of, pad_ids, tokenize
from recbole_iisan.towers.image_transform import ImageTransform, resolve_image_backend

logger = logging.getLogger()

DEFAULT_IMAGE_SIZE = 224


def image_pixels(store: Any, tokens: list[str], transform: Any, batch: int = 64) -> tuple[np.ndarray, int]:
    """uint8 ``[len(tokens), 3, H, W]`` of the tower's image transform
    (:meth:`~recbole_iisan.towers.image_transform.ImageTransform.resized`: the decode, resize and
    crop the cache builder uses); tokens without an image are black. Returns (pixels, n missing)."""
    have = [i for i, t in enumerate(tokens) if t in store]
    out = None
    for k in range(0, len(have), batch):
        rows = have[k:k + batch]
        pix = transform.resized(store.get_bytes_many([tokens[i] for i in rows])).numpy()
        if out is None:
            out = np.zeros((len(tokens),) + pix.shape[1:], dtype=np.uint8)
        out[rows] = pix
    if out is None:  # no image at all: black images of the transform's size
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)).save(buf, "PNG")
        shape = transform.resized([buf.getvalue()]).shape[1:]
        out = np.zeros((len(tokens),) + tuple(shape), dtype=np.uint8)
    return out, len(tokens) - len(have)


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

        try:
            backend = resolve_image_backend(dict(getattr(spec, "extra", {}) or {}).get("image_backend", "auto"),
                                            spec.name)
        except ValueError as exc:
            raise EncoderLoadError(str(exc)) from None
        transform = ImageTransform(load_image_processor(spec.encoder, backend), backend)
        mean, std, rescale = transform.normalisation()
        store = find_image_store(self.config, tokens, spec.name)
        have = [t for t in tokens if t in store]
        missing = len(tokens) - len(have)
        check_missing_images(self.config, spec.name, [t for t in tokens if t not in store], len(tokens), "black images")
        processor = transform.processor
        digest = hashlib.sha256(
            (store_path(store) + "\0" + "\0".join(tokens) + "\0" + "\0".join(have)
             + f"\0{backend}\0{processor.to_json_string() if processor is not None else 'paper'}").encode()
        ).hexdigest()[:16]
        npy = None
        try:
            npy = Path(cache_root(self.config)) / f"raw-{spec.name}-{digest}.npy"
        except Exception:  # noqa: BLE001 - no writable cache folder: decode every time
            npy = None
        if npy is not None and npy.is_file():
            pixels = np.load(npy)
            logger.info(f"tower '{spec.name}': decoded pixels reused from {npy}")
        else:
            pixels, _ = image_pixels(store, tokens, transform)
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
