"""Image + text artifacts (CLIP, SigLIP): two graphs, each validated; int8 gated on both towers; the zero-shot,
feature-extraction and image-feature-extraction pipelines against transformers on the same weights."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import CORPUS, assert_same

import kiln
from kiln.artifact import load_manifest
from kiln.cli.__main__ import main
from kiln.errors import InputError

LABELS = ["cat", "dog", "a red car"]
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=30,
              patch_size=6)


def clip_tokenizer():
    """A CLIP tokenizer (lower-cased BPE with end-of-word suffixes) trained on the test corpus."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.normalizer, bpe.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    bpe.train_from_iterator(CORPUS + LABELS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges)


def siglip_spiece(path):
    """SigLIP's tokenizer as the hub ships it: a SentencePiece model (no tokenizer.json), </s> ending each text."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5), model_prefix=str(path / "spiece"), vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2)
    (path / "spiece.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "SiglipTokenizer", "model_max_length": 64, "do_lower_case": True,
        "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))


def perturb(model):
    import torch

    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        model.logit_scale.fill_(np.log(10.0))
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(-3.0)


def make_clip(path):
    import torch
    import transformers

    tokenizer = clip_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(TEXT, vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=VISION, projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    perturb(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(path)
    return path


def make_siglip(path):
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    siglip_spiece(path)
    config = transformers.SiglipConfig(
        text_config=dict(TEXT, vocab_size=120, max_position_embeddings=64, pad_token_id=0, eos_token_id=1),
        vision_config=VISION)
    torch.manual_seed(0)
    model = transformers.SiglipModel(config).eval()
    perturb(model)
    model.save_pretrained(path)
    transformers.SiglipImageProcessor(size={"height": 30, "width": 30}).save_pretrained(path)
    return path


def images(tmp_path, count=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        array = rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)
        array[: 10 * (i + 1)] = (255, 40 * i, 0)
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(array).save(paths[-1])
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(family: str, precision: str = "fp32"):
        if (family, precision) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{precision}")
            path = (make_clip if family == "clip" else make_siglip)(root / "checkpoint")
            kiln.export(str(path), root / "artifact", task="zero-shot-image-classification", batch="1:8",
                        precision=precision)
            cache[(family, precision)] = path, root / "artifact"
        return cache[(family, precision)]

    return get


def hf(task, path):
    import transformers

    return transformers.pipeline(task, model=str(path), device="cpu")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_two_graphs_each_validated(exported, family):
    _, out = exported(family)
    manifest = load_manifest(out)
    assert manifest["model"] == "text.onnx" and manifest["vision"]["model"] == "vision.onnx"
    assert manifest["validation"]["passed"] and manifest["vision"]["validation"]["passed"]
    text = onnx.load(str(out / "text.onnx")).graph
    vision = onnx.load(str(out / "vision.onnx")).graph
    assert Counter(n.op_type for n in text.node)["Attention"] == 2
    assert Counter(n.op_type for n in vision.node)["Attention"] == (2 if family == "clip" else 3)  # + SigLIP's head
    assert [i.name for i in text.input] == ["input_ids", "attention_mask"]
    assert manifest["zero_shot"]["function"] == ("softmax" if family == "clip" else "sigmoid")
    assert (out / "tokenizer.json").is_file()  # SigLIP's converted from spiece.model


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_zero_shot_image_classification_matches_transformers(exported, family, tmp_path):
    path, out = exported(family)
    pictures = images(tmp_path)
    ours = kiln.pipeline("zero-shot-image-classification", out)
    theirs = hf("zero-shot-image-classification", path)
    assert_same(ours(pictures[0], candidate_labels=LABELS), theirs(pictures[0], candidate_labels=LABELS))
    assert_same(ours(pictures, LABELS), theirs(pictures, candidate_labels=LABELS))
    template = "a picture of {}"
    assert_same(ours(pictures, candidate_labels=LABELS, hypothesis_template=template),
                theirs(pictures, candidate_labels=LABELS, hypothesis_template=template))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_each_tower_embeds_alone(exported, family, tmp_path):
    """feature-extraction on the artifact: the text tower's unit embeddings; image-feature-extraction: the vision
    tower's; both equal transformers' get_text_features / get_image_features, normalized."""
    import torch
    import transformers

    path, out = exported(family)
    model = transformers.AutoModel.from_pretrained(path).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    texts = ["a photo of a cat", "hello world, the river runs through paris"]
    padding = {"padding": "max_length", "max_length": 64} if family == "siglip" else {"padding": True}
    with torch.no_grad():
        want = model.get_text_features(**processor.tokenizer(texts, return_tensors="pt", **padding))
        want = getattr(want, "pooler_output", want)
    want = torch.nn.functional.normalize(want, dim=-1).numpy()
    got = np.array(kiln.pipeline("feature-extraction", out)(texts))
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-6)
    raw = kiln.pipeline("feature-extraction", out)(texts, normalize=False, return_tensors=True)
    np.testing.assert_allclose(raw[0] / np.linalg.norm(raw[0]), want[0], atol=1e-5)
    with pytest.raises(InputError, match="pooling applies to token vectors"):
        kiln.pipeline("feature-extraction", out)(texts, pooling="mean")
    from PIL import Image

    pictures = images(tmp_path)
    with torch.no_grad():
        pixels = processor.image_processor(images=[Image.open(p) for p in pictures], return_tensors="pt")
        want = model.get_image_features(pixel_values=pixels["pixel_values"])
        want = getattr(want, "pooler_output", want)
    want = torch.nn.functional.normalize(want, dim=-1).numpy()
    got = np.array(kiln.pipeline("image-feature-extraction", out)(pictures))
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(InputError, match="pool does not apply"):
        kiln.pipeline("image-feature-extraction", out)(pictures, pool=True)


def test_int8_is_gated_on_both_towers(exported, tmp_path):
    path, out = exported("clip", "int8")
    manifest = load_manifest(out)
    accuracy = manifest["accuracy"]
    assert manifest["precision"] == "int8" and accuracy["passed"]
    assert accuracy["text_mean_cosine"] >= 0.99 and accuracy["image_mean_cosine"] >= 0.99
    assert 0 <= accuracy["zero_shot_top1_agreement"] <= 1
    for graph in ("text.onnx", "vision.onnx"):
        ops = Counter(n.op_type for n in onnx.load(str(out / graph)).graph.node)
        assert ops["DynamicQuantizeLinear"] or ops["MatMulInteger"] or ops["DynamicQuantizeMatMul"]
    result = kiln.pipeline("zero-shot-image-classification", out)(images(tmp_path)[0], LABELS)
    assert sorted(r["label"] for r in result) == sorted(LABELS)


def test_cli_candidate_labels_on_images(exported, tmp_path, capsys):
    path, out = exported("clip")
    picture = images(tmp_path)[0]
    assert main(["run", str(out), picture, "--candidate-labels", *LABELS]) == 0
    line = json.loads(capsys.readouterr().out)
    assert_same(line["output"], hf("zero-shot-image-classification", path)(picture, candidate_labels=LABELS))


def test_bad_input(exported, tmp_path):
    _, out = exported("clip")
    pipe = kiln.pipeline("zero-shot-image-classification", out)
    with pytest.raises(InputError, match="needs candidate_labels"):
        pipe(images(tmp_path)[0])
    with pytest.raises(InputError, match="must contain"):
        pipe(images(tmp_path)[0], LABELS, hypothesis_template="no label")
    with pytest.raises(InputError, match="bf16 for image \\+ text artifacts"):
        kiln.export(str(exported("clip")[0]), tmp_path / "bf16", task="zero-shot-image-classification",
                    precision="bf16")


def test_siglip_tokenizer_converted_as_siglip_tokenizes(exported):
    """The tokenizer.json converted from spiece.model gives SiglipTokenizer's ids: lower-cased, ASCII punctuation
    removed, whitespace collapsed and stripped, </s> appended."""
    import transformers

    path, out = exported("siglip")
    slow = transformers.AutoTokenizer.from_pretrained(path)
    ours = kiln.pipeline("feature-extraction", out).tokenizer
    texts = ["Hello, World!  Paris is the capital.", "  The RIVER runs -- through it?? ", "3.14 is pi", "a\tb\nc",
             "ünïcode café", "a photo of a cat"]
    batch = ours(texts)
    for row, mask, text in zip(batch.input_ids, batch.attention_mask, texts):
        assert row[mask == 1].tolist() == slow(text)["input_ids"], text
