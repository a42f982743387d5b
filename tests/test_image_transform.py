"""Image bytes -> pixel values (recbole_iisan.towers.image_transform): the PIL path against a hand
computation and the encoder's processor, torchvision against PIL, the config key and the cache
identity. The torchvision comparisons run only where torchvision imports beside the installed torch
(not in CI: PyPI's torchvision does not load beside the local CPU torch build; docs/data-and-caches.md)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_iisan.towers import image_transform as imgtf
from recbole_iisan.towers.spec import TowerConfigError, tower_specs

from conftest import SHARED  # noqa: E402
DINO = SHARED / "models/dinov2-small"
POSTERS = SHARED / "datasets/ml-100k-posters"
TV = imgtf.torchvision_problem()
needs_tv = pytest.mark.skipif(TV is not None, reason=f"torchvision cannot run here: {TV}")


def _jpeg(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _random_images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(150, 400)), int(rng.integers(150, 400))
        base = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)  # smooth, photo-like
        arr = np.asarray(Image.fromarray(base).resize((w, h), resample=3))
        out.append(_jpeg(arr, "PNG" if i % 3 == 2 else "JPEG"))
    return out


def test_paper_transform_by_hand() -> None:
    """A 224x224 PNG is not resized: the values are (x / 255 - 0.5) / 0.5 exactly."""
    arr = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    got = imgtf.ImageTransform(None, "pil")([_jpeg(arr, "PNG")])
    want = (torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None] / 255.0 - 0.5) / 0.5
    assert got.shape == (1, 3, 224, 224) and torch.allclose(got, want, atol=1e-6)


@pytest.mark.skipif(not DINO.is_dir(), reason="dinov2-small not available")
def test_pil_bytes_path_equals_the_processor_on_pil_images() -> None:
    from transformers import AutoImageProcessor

    datas = _random_images(5)
    proc = AutoImageProcessor.from_pretrained(str(DINO), backend="pil")
    want = proc(images=[Image.open(io.BytesIO(d)).convert("RGB") for d in datas], return_tensors="pt")["pixel_values"]
    tf = imgtf.ImageTransform(imgtf.load_image_processor(str(DINO), "pil"), "pil")
    assert torch.equal(tf(datas), want)
    assert torch.equal(tf.from_images([Image.open(io.BytesIO(d)) for d in datas]), want)


def test_backend_key_and_resolution() -> None:
    from conftest import plugin_defaults

    cfg = dict(plugin_defaults(), towers=["text", "image"], text_encoder="x", image_encoder="y", image_backend="opencv")
    with pytest.raises(TowerConfigError, match="image_backend.*'opencv'"):
        tower_specs(cfg, ["title"])
    cfg["image_backend"] = "pil"
    assert dict(tower_specs(cfg, ["title"])[1].extra) == {"image_backend": "pil"}
    assert imgtf.resolve_image_backend("pil") == "pil"
    assert imgtf.resolve_image_backend("auto") == ("torchvision" if TV is None else "pil")
    if TV is None:
        assert imgtf.resolve_image_backend("torchvision") == "torchvision"
    else:
        with pytest.raises(ValueError, match="image_backend.*torchvision.*cannot run here"):
            imgtf.resolve_image_backend("torchvision")
    with pytest.raises(ValueError, match="'image_backend'"):
        imgtf.resolve_image_backend("cv2")


def test_cache_identity_keeps_pil_caches_and_separates_torchvision() -> None:
    """Caches built before the key existed (PIL) keep their digest; torchvision states differ
    slightly, so they get their own cache."""
    assert imgtf.preprocessing_identity("pil") == "AutoImageProcessor or resize224+norm0.5"
    assert imgtf.preprocessing_identity("torchvision") != imgtf.preprocessing_identity("pil")


@needs_tv
def test_torchvision_decodes_jpeg_and_png_like_pil() -> None:
    datas = _random_images(6)
    tv = imgtf.decode_tensors(datas)
    pil = imgtf.decode_pil(datas)
    for t, p in zip(tv, pil):
        ref = torch.from_numpy(np.array(p)).permute(2, 0, 1)
        assert t.dtype == torch.uint8 and t.shape == ref.shape
        # libjpeg-turbo's IDCT and Pillow's can differ by a step; PNG is lossless: equal
        assert int((t.int() - ref.int()).abs().max()) <= 2


@needs_tv
def test_torchvision_paper_transform_within_one_step_of_pil() -> None:
    datas = _random_images(6)
    a = imgtf.ImageTransform(None, "pil")(datas)
    b = imgtf.ImageTransform(None, "torchvision")(datas)
    step = (1 / 255) / 0.5
    assert a.shape == b.shape == (6, 3, 224, 224)
    assert float((a - b).abs().max()) <= 2 * step + 1e-6
    assert float((a - b).abs().mean()) < 0.1 * step


@needs_tv
@pytest.mark.skipif(not DINO.is_dir(), reason="dinov2-small not available")
def test_torchvision_processor_close_to_pil_on_real_posters() -> None:
    datas = [p.read_bytes() for p in sorted(POSTERS.glob("*.jpg"))[:16]]
    a = imgtf.ImageTransform(imgtf.load_image_processor(str(DINO), "pil"), "pil")(datas)
    b = imgtf.ImageTransform(imgtf.load_image_processor(str(DINO), "torchvision"), "torchvision")(datas)
    step = (1 / 255) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    steps = (a - b).abs() / step
    assert a.shape == b.shape
    assert float((steps > 1.01).float().mean()) < 0.01  # bicubic resampling differs in < 1% of values


@pytest.mark.skipif(not DINO.is_dir() or not POSTERS.is_dir(), reason="../shared dinov2-small or posters absent")
def test_live_model_path_and_cache_give_the_same_hidden_states(tmp_path) -> None:
    """One decode path: the live models' pixels (``data/raw_inputs``, normalised on the fly by
    ``model/states.Backbones``) and the cache builder's give the same hidden states for the same
    image files, with dinov2-small under the hub's own preprocessing (shortest edge 256, then a
    224 centre crop: the earlier live path resized straight to 224x224 and got other states)."""
    import json
    from types import SimpleNamespace

    from conftest import plugin_defaults
    from recbole_iisan.data import cache as cache_mod
    from recbole_iisan.data.images import ImageStore, import_images
    from recbole_iisan.data.raw_inputs import image_pixels
    from recbole_iisan.model.states import Backbones
    from recbole_iisan.towers.encoders import load_image_processor
    from recbole_iisan.towers.spec import TowerSpec

    enc = tmp_path / "dinov2-crop"
    enc.mkdir()
    for name in ("config.json", "model.safetensors"):
        (enc / name).symlink_to(DINO / name)
    pre = json.loads((DINO / "preprocessor_config.json").read_text())
    pre.update(size={"shortest_edge": 256}, do_center_crop=True, crop_size={"height": 224, "width": 224})
    (enc / "preprocessor_config.json").write_text(json.dumps(pre))
    posters = sorted(POSTERS.glob("*.jpg"))[:3]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    tokens = []
    for p in posters:
        (imgs / p.name).symlink_to(p)
        tokens.append(p.stem)
    assert any(Image.open(p).size[0] != Image.open(p).size[1] for p in posters)  # the crop matters
    store_path = tmp_path / "store"
    import_images(imgs, store_path, item_tokens=tokens, progress=False)
    store = ImageStore(store_path)
    spec = TowerSpec("image", "image", str(enc), extra={"image_backend": "pil"})
    layers = [0, 6, 12]

    config = {**plugin_defaults(), "cache_dir": str(tmp_path / "cache"), "cache_dtype": "float32",
              "encoder_dtype": "float32", "image_backend": "pil", "show_progress": False, "dataset": "posters",
              "data_path": str(tmp_path)}
    folder = cache_mod.ensure_cache(config, spec, layers, tokens, image_store=store)
    cached, missing = cache_mod.load_states(folder, tokens, layers, dtype=torch.float32)
    assert not missing

    transform = imgtf.ImageTransform(load_image_processor(str(enc), "pil"), "pil")
    pixels, n_missing = image_pixels(store, tokens, transform)
    assert n_missing == 0 and pixels.dtype == np.uint8 and pixels.shape == (3, 3, 224, 224)
    mean, std, rescale = transform.normalisation()
    inputs = {"pixels": torch.from_numpy(np.concatenate([np.zeros_like(pixels[:1]), pixels])),
              "mean": torch.tensor(mean), "std": torch.tensor(std), "rescale": torch.tensor(rescale)}
    dataset = SimpleNamespace(towers=["image", "image2"], tower_specs={"image": spec, "image2": spec},
                              item_inputs={"image": inputs, "image2": inputs})
    live = Backbones(dataset, n_items=len(tokens) + 1, always_eval=True)
    with torch.no_grad():
        states = live.hidden_rows("image", torch.arange(1, len(tokens) + 1), layers)
    torch.testing.assert_close(states, cached, rtol=1e-4, atol=1e-4)
    # and the states are the ones of the cropped image, not of the image squeezed to 224x224
    squeezed = [np.asarray(Image.open(p).convert("RGB").resize((224, 224), resample=3)) for p in posters]
    assert not np.array_equal(pixels.transpose(0, 2, 3, 1), np.stack(squeezed))
