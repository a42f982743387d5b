"""The hidden-state cache: each frozen encoder runs once over every item of the dataset's ``.item``
file; the pooled states of the hidden states the model reads are kept in an LMDB store. The
decoupled PEFT of IISAN keeps the backbones out of the trained path, so their hidden states do not
change while training and are read from here instead of recomputed ("IISAN: Efficiently Adapting
Multimodal Representation for Sequential Recommendation with Decoupled PEFT", SIGIR 2024,
arXiv:2404.02059; IISAN-Versa, "Efficient and Effective Adaptation of Multimodal Foundation
Models in Sequential Recommendation", IEEE TKDE, arXiv:2411.02992).

One module a job, imports pointing one way (``layout`` and ``paths`` import no other module here):

* ``layout``: what a cache folder holds (file names, manifest, the LMDB store, one value's bytes
  and checksum).
* ``paths``: where a config's caches live and what they are built from (dataset folder, item
  file, image store, towers, the hidden states each tower keeps).
* ``identity`` (<- layout): the identity record whose digest names a folder.
* ``integrity`` (<- layout, identity): the checks before a folder is trusted; ``verify_cache``.
* ``load`` (<- layout, integrity): ``load_states``, rows of a complete cache as one tensor.
* ``reuse`` (<- layout, integrity): before a build, reuse a folder, resume it or clear it.
* ``workers`` (<- layout): who encodes the batches (this process, local processes, Ray actors).
* ``build`` (<- all but load): ``ensure_cache`` (one tower) and ``ensure_caches`` (a config's towers).
* ``storage`` (<- layout, load): how a model holds the states (in memory or memory-mapped).

This package re-exports the API the rest of the plugin uses; the modules say the details.
"""
from __future__ import annotations

from recbole_iisan.data.cache.build import ensure_cache, ensure_caches
from recbole_iisan.data.cache.integrity import verify_cache
from recbole_iisan.data.cache.layout import (CACHE_DTYPES, COMPLETE, CRC_BYTES, DATA, FORMAT_VERSION, MANIFEST,
                                             is_complete, read_manifest)
from recbole_iisan.data.cache.load import load_states
from recbole_iisan.data.cache.paths import (cache_root, dataset_dir, encoder_depth, model_layers, read_item_file,
                                            required_layers, tower_specs_for)
from recbole_iisan.utils.errors import CacheDamagedError, CacheError

__all__ = [
    "CACHE_DTYPES", "COMPLETE", "CRC_BYTES", "DATA", "FORMAT_VERSION", "MANIFEST",
    "CacheDamagedError", "CacheError", "cache_root", "dataset_dir", "encoder_depth", "ensure_cache", "ensure_caches",
    "is_complete", "load_states", "model_layers", "read_item_file", "read_manifest", "required_layers",
    "tower_specs_for", "verify_cache",
]
