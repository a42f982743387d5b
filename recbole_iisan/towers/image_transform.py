"""Image bytes -> the pixel values an image encoder reads, with PIL or with torchvision.

Two backends, the config key ``image_backend`` (``auto | pil | torchvision``):

- ``pil``: Pillow decodes, then the encoder's Hugging Face image processor with its PIL backend
  (or, for an encoder without a processor config, the paper's transform: resize straight to
  224x224 bilinear, to [0, 1], normalise with mean = std = 0.5).
- ``torchvision``: ``torchvision.io.decode_jpeg`` decodes the JPEGs of a batch in one call
  (libjpeg-turbo; other formats through ``decode_image``), then the same processor with its
  torchvision backend (transformers' tensor implementation of the same resize, rescale and
  normalise), or the paper's transform on uint8 tensors (antialiased bilinear resize).
- ``auto``: torchvision when it imports and decodes here, else PIL.

The two give pixels equal to within a few uint8 steps of resampling (``tests/test_image_transform.py``;
``benchmarks/cache_build.py --image_dir`` measures both), so the cache records which one built
it. torchvision's compiled operators need the torch build they were built against: beside a
mismatched torch it raises ``operator torchvision::nms does not exist`` at import, and ``auto``
then uses PIL.
"""
from __future__ import annotations

import functools
import io
from typing import Any, Sequence

import numpy as np
import torch

IMAGE_BACKENDS = ("auto", "pil", "torchvision")
PAPER_SIZE = 224
PAPER_TRANSFORM = "resize224+norm0.5"


@functools.lru_cache(maxsize=1)
def torchvision_problem() -> str | None:
    """None when torchvision imports and decodes a JPEG here; otherwise why not (one line)."""
    try:
        import torchvision.io as tvio
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, "JPEG")
        tvio.decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    except Exception as exc:  # noqa: BLE001 - ImportError, RuntimeError of a mismatched build, ...
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return None


def resolve_image_backend(requested: str, tower: str = "image") -> str:
    """``auto`` -> ``torchvision`` or ``pil``; an explicit ``torchvision`` that cannot run is an
    error naming the key and the reason."""
    requested = str(requested or "auto")
    if requested not in IMAGE_BACKENDS:
        raise ValueError(f"config key 'image_backend' (tower '{tower}'): expected one of {IMAGE_BACKENDS}, "
                         f"got {requested!r}")
    if requested == "pil":
        return "pil"
    problem = torchvision_problem()
    if problem is None:
        return "torchvision"
    if requested == "torchvision":
        raise ValueError(f"config key 'image_backend' (tower '{tower}') is 'torchvision' but torchvision "
                         f"cannot run here ({problem}); install a torchvision built for torch "
                         f"{torch.__version__} or set image_backend: pil")
    return "pil"


# --------------------------------------------------------------------------------------------
# decoding

def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_pil(datas: Sequence[bytes]) -> list[Any]:
    """RGB PIL images of encoded image bytes."""
    from PIL import Image

    out = []
    for data in datas:
        with Image.open(io.BytesIO(data)) as img:
            out.append(img.convert("RGB"))
    return out


def decode_tensors(datas: Sequence[bytes]) -> list[torch.Tensor]:
    """uint8 ``[3, H, W]`` RGB tensors of encoded image bytes: every JPEG of the batch in one
    ``decode_jpeg`` call, any other format through ``decode_image``."""
    import torchvision.io as tvio

    rgb = tvio.ImageReadMode.RGB
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    out: list[torch.Tensor | None] = [None] * len(raw)
    jpegs = [i for i, d in enumerate(datas) if _is_jpeg(d)]
    if jpegs:
        for i, t in zip(jpegs, tvio.decode_jpeg([raw[i] for i in jpegs], mode=rgb)):
            out[i] = t
    for i, t in enumerate(out):
        if t is None:
            out[i] = tvio.decode_image(raw[i], mode=rgb)
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# the paper's transform (an encoder without an image processor)

def paper_resize(images: Sequence[Any]) -> torch.Tensor:
    """uint8 ``[B, 3, 224, 224]``: resized straight to 224x224 (bilinear). ``images`` are PIL
    images or uint8 ``[3, H, W]`` tensors."""
    if images and isinstance(images[0], torch.Tensor):
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        return torch.stack([F.resize(t, [PAPER_SIZE, PAPER_SIZE], interpolation=InterpolationMode.BILINEAR,
                                     antialias=True) for t in images])
    arrays = [np.asarray(img.convert("RGB").resize((PAPER_SIZE, PAPER_SIZE), resample=2), dtype=np.uint8)
              for img in images]  # resample=2: bilinear
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def paper_transform(images: Sequence[Any]) -> torch.Tensor:
    """float32 ``[B, 3, 224, 224]``: :func:`paper_resize`, to [0, 1], normalise with 0.5 / 0.5."""
    return (paper_resize(images).float() / 255.0 - 0.5) / 0.5


# --------------------------------------------------------------------------------------------
# the processor

def load_image_processor(path: str, backend: str, **kwargs: Any) -> Any:
    """``AutoImageProcessor.from_pretrained`` with the given backend, or None when the encoder has
    no processor config (the paper's transform is used then)."""
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["backend"] = backend
    else:  # transformers 4.x: the same choice is use_fast
        kwargs["use_fast"] = backend == "torchvision"
    try:
        return AutoImageProcessor.from_pretrained(path, **kwargs)
    except Exception:  # noqa: BLE001 - no preprocessor config: the paper's transform
        return None


def preprocessing_identity(backend: str) -> str:
    """What a cache records of its image preprocessing (PIL keeps the string caches had before)."""
    base = "AutoImageProcessor or " + PAPER_TRANSFORM
    return base if backend == "pil" else f"{base} ({backend})"


class ImageTransform:
    """Encoded image bytes (or PIL images) -> float32 ``[B, 3, H, W]`` pixel values, one backend."""

    def __init__(self, processor: Any, backend: str) -> None:
        if backend not in ("pil", "torchvision"):
            raise ValueError(f"ImageTransform backend must be resolved to 'pil' or 'torchvision', got {backend!r}")
        self.processor = processor
        self.backend = backend

    def _pixels(self, images: Sequence[Any]) -> torch.Tensor:
        if self.processor is None:
            return paper_transform(images)
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def decode(self, datas: Sequence[bytes]) -> list[Any]:
        """Encoded image bytes -> RGB images of this backend (PIL images or uint8 tensors)."""
        return (decode_tensors if self.backend == "torchvision" else decode_pil)(datas)

    def __call__(self, datas: Sequence[bytes]) -> torch.Tensor:
        return self._pixels(self.decode(datas))

    def resized(self, datas: Sequence[bytes]) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]``: the pixels :meth:`__call__` computes before rescaling and
        normalising (the same decode, resize and crop), for models that keep their items' images
        as uint8 and normalise on the fly with :meth:`normalisation`."""
        images = self.decode(datas)
        if self.processor is None:
            return paper_resize(images)
        x = self.processor(images=list(images), return_tensors="pt", do_rescale=False,
                           do_normalize=False)["pixel_values"]
        return x if x.dtype == torch.uint8 else x.round().clamp(0, 255).to(torch.uint8)

    def normalisation(self) -> tuple[list[float], list[float], float]:
        """``(mean, std, rescale)`` with ``__call__(d) == (resized(d) * rescale - mean) / std``."""
        p = self.processor
        if p is None:
            return [0.5] * 3, [0.5] * 3, 1 / 255.0
        mean = list(p.image_mean) if getattr(p, "do_normalize", True) else [0.0] * 3
        std = list(p.image_std) if getattr(p, "do_normalize", True) else [1.0] * 3
        rescale = float(p.rescale_factor) if getattr(p, "do_rescale", True) else 1.0
        return mean, std, rescale

    def from_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images (the live models' input) -> pixel values."""
        rgb = [img.convert("RGB") for img in images]
        if self.backend == "torchvision":
            rgb = [torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1) for img in rgb]
        return self._pixels(rgb)


__all__ = ["IMAGE_BACKENDS", "ImageTransform", "decode_pil", "decode_tensors", "load_image_processor",
           "paper_resize", "paper_transform", "preprocessing_identity", "resolve_image_backend", "torchvision_problem"]
