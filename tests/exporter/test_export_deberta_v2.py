"""DeBERTa-v2/v3 artifacts: one fused Attention node per layer (the relative terms as its additive mask), validated,
int8 gated, and pipelines equal to transformers.pipeline on the same weights."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
from conftest import assert_same, make_deberta

import kiln
from kiln.artifact import load_manifest

TEXTS = ["the movie was terrible", "paris is the capital city of france and the river runs through it", "a"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, artifact) per (variant, task, precision), exported once."""
    cache = {}

    def get(task: str, variant: str = "v3", precision: str = "fp32"):
        key = (task, variant, precision)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"deberta-{variant}-{task}")
            path, _ = make_deberta(root / "checkpoint", task, variant)
            kiln.export(str(path), root / "artifact", task=task, batch="1:8", seq="1:64", precision=precision)
            cache[key] = (path, root / "artifact")
        return cache[key]

    return get


def hf(task, path):
    import transformers

    return transformers.pipeline(task, model=str(path), device="cpu")


@pytest.mark.parametrize("variant,task", [("v3", "text-classification"), ("v3", "token-classification"),
                                          ("v3", "fill-mask"), ("v3", "question-answering"),
                                          ("v2", "feature-extraction")])
def test_exports_with_one_attention_node_per_layer(exported, variant, task):
    _, out = exported(task, variant)
    manifest = load_manifest(out)
    assert manifest["validation"]["passed"]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert Counter(n.op_type for n in graph.node)["Attention"] == 2
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"] + (["token_type_ids"] if variant == "v2" else [])


def test_text_classification_and_zero_shot_match_transformers(exported):
    path, out = exported("text-classification")
    assert_same(kiln.pipeline("text-classification", out)(TEXTS, top_k=None),
                hf("text-classification", path)(TEXTS, top_k=None))
    # DeBERTa-v3 NLI checkpoints are today's zero-shot classifiers: the same artifact runs it
    labels = ["movie", "city", "river"]
    assert_same(kiln.pipeline("zero-shot-classification", out)(TEXTS, candidate_labels=labels),
                hf("zero-shot-classification", path)(TEXTS, candidate_labels=labels))


def test_token_classification_and_fill_mask_match_transformers(exported):
    path, out = exported("token-classification")
    theirs = hf("token-classification", path)(TEXTS[1], ignore_labels=[])
    assert_same(kiln.pipeline("token-classification", out)(TEXTS[1], ignore_labels=[]),
                [{k: float(v) if k == "score" else v for k, v in e.items()} for e in theirs])
    path, out = exported("fill-mask")
    masked = "the capital of france is [MASK]."
    assert_same(kiln.pipeline("fill-mask", out)(masked, top_k=3), hf("fill-mask", path)(masked, top_k=3))


def test_int8_passes_its_gate(exported):
    path, out = exported("text-classification", precision="int8")
    manifest = load_manifest(out)
    assert manifest["precision"] == "int8" and manifest["accuracy"]["passed"]
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["Attention"] == 2 and (ops["MatMulInteger"] or ops["DynamicQuantizeMatMul"] or ops["QLinearMatMul"])


def sentencepiece_checkpoint(path):
    """A DeBERTa-v3 checkpoint as the hub has them: a SentencePiece ``spm.model`` and no tokenizer.json."""
    import json

    import sentencepiece
    from conftest import CORPUS

    path.mkdir(parents=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5), model_prefix=str(path / "spm"), vocab_size=120, model_type="unigram",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
        unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2)
    (path / "spm.vocab").unlink()
    special = {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "sep_token": "[SEP]",
               "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DebertaV2Tokenizer",
                                                            "do_lower_case": False, "model_max_length": 64, **special}))
    make_deberta(path / "model", "text-classification", vocab_size=120)
    for name in ("config.json", "model.safetensors"):
        (path / "model" / name).replace(path / name)
    return path


def test_a_sentencepiece_only_checkpoint_gets_a_tokenizer_json(tmp_path):
    import sentencepiece

    path = sentencepiece_checkpoint(tmp_path / "ckpt")
    assert not (path / "tokenizer.json").exists()
    kiln.export(str(path), tmp_path / "art", task="text-classification", batch="1:4", seq="1:64")
    assert (tmp_path / "art" / "tokenizer.json").is_file()
    texts = ["Hello world, paris is the capital", "the river runs through berlin"]
    ours = kiln.pipeline("text-classification", tmp_path / "art")
    batch = ours.tokenizer(texts)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(path / "spm.model"))
    for row, text in zip(batch.input_ids, texts):  # [CLS] pieces [SEP], the pieces SentencePiece itself cuts
        assert row[row != 0].tolist() == [1, *spm.encode(text), 2]
    assert_same(ours(texts, top_k=None), hf("text-classification", path)(texts, top_k=None))


def test_the_conversion_needs_sentencepiece(tmp_path, monkeypatch):
    import importlib.util

    from kiln.errors import InputError

    path = sentencepiece_checkpoint(tmp_path / "ckpt")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    with pytest.raises(InputError, match=r"spm.model.*pip install 'kiln\[sentencepiece\]'"):
        kiln.export(str(path), tmp_path / "art", task="text-classification")
    assert not (tmp_path / "art").exists()
