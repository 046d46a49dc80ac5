"""Head masks (the seed's promise; transformers 5 removed them): the references take transformers' head_mask and give
transformers 4.57's numbers (run from .venv-hf457 by hf457_models.py); `kiln export --head-mask` gives the graph an
optional head_mask input, default all ones, that the engine and the pipelines feed per call; masked heads show as
zeros in the returned attentions; bad masks are refused with the shapes and range allowed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from conftest import TINY_LLAMA, make_causal_lm
from kiln.errors import InputError
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

ROOT = Path(__file__).resolve().parents[2]
ORACLE_PYTHON = ROOT / ".venv-hf457" / "bin" / "python"
ORACLE = Path(__file__).with_name("hf457_models.py")
MASK = [[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.5, 0.0]]  # (layers, heads): masked, kept and half-scaled heads


def oracle(calls: list[dict]) -> list[dict]:
    if not ORACLE_PYTHON.is_file():
        pytest.skip("transformers 4.57 oracle venv missing (.venv-hf457): run `bash scripts/setup.sh` to create it")
    done = subprocess.run([str(ORACLE_PYTHON), str(ORACLE)], input=json.dumps({"calls": calls}), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout)["answers"]
    for answer in answers:
        assert "error" not in answer, answer
    return answers


IDS = [[2, 17, 33, 41, 8, 3], [2, 25, 9, 3, 0, 0]]


@pytest.mark.parametrize("mask", [MASK, MASK[1]], ids=["layers-x-heads", "heads"])
def test_bert_matches_transformers_457(checkpoints, mask):
    path, _ = checkpoints("bert", "text-classification")
    attention_mask = [[1] * 6, [1, 1, 1, 1, 0, 0]]
    [want] = oracle([{"model": str(path), "auto": "AutoModelForSequenceClassification", "head_mask": mask,
                      "inputs": {"input_ids": IDS, "attention_mask": attention_mask},
                      "outputs": ["logits", "attentions"]}])
    ours = kiln.from_pretrained(path, task="text-classification")
    with torch.no_grad():
        got = ours(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(attention_mask), head_mask=torch.tensor(mask),
                   output_attentions=True)
    np.testing.assert_allclose(got["logits"].numpy(), want["logits"], atol=1e-5)
    for layer, probs in enumerate(got["attentions"]):
        np.testing.assert_allclose(probs.numpy(), want["attentions"][layer], atol=1e-5)
    masked = np.broadcast_to(np.asarray(mask), (2, 4)) == 0
    assert all(float(got["attentions"][i][:, h].abs().max()) == 0 for i, h in zip(*np.nonzero(masked)))


def test_gpt2_and_vit_match_transformers_457(tmp_path, vit_checkpoints):
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    vit, _ = vit_checkpoints("image-classification")
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).round(3).tolist()
    gpt2, image = oracle([
        {"model": str(tmp_path / "gpt2"), "auto": "GPT2LMHeadModel", "head_mask": MASK,
         "inputs": {"input_ids": [[5, 6, 7, 8]]}, "outputs": ["logits"]},
        {"model": str(vit), "auto": "ViTForImageClassification", "head_mask": MASK,
         "inputs": {"pixel_values": pixels}, "outputs": ["logits"]}])
    with torch.no_grad():
        ours = kiln.from_pretrained(tmp_path / "gpt2", task="text-generation")
        np.testing.assert_allclose(ours(torch.tensor([[5, 6, 7, 8]]), head_mask=torch.tensor(MASK))["logits"].numpy(),
                                   gpt2["logits"], atol=1e-5)
        ours = kiln.from_pretrained(vit, task="image-classification")
        np.testing.assert_allclose(ours(torch.tensor(pixels), head_mask=torch.tensor(MASK))["logits"].numpy(),
                                   image["logits"], atol=1e-5)


def test_llama_masks_what_it_is_told(tmp_path):
    """transformers' Llama never had head_mask; kiln's reference applies the same rule as its other families."""
    make_causal_lm(tmp_path / "llama", "llama", **TINY_LLAMA)
    ours = kiln.from_pretrained(tmp_path / "llama", task="text-generation")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = ours(ids)["logits"]
        ones = ours(ids, head_mask=torch.ones(4))["logits"]
        masked = ours(ids, head_mask=torch.tensor(MASK), output_attentions=True)
    torch.testing.assert_close(ones, plain)
    assert (masked["logits"] - plain).abs().max() > 1e-3
    assert float(masked["attentions"][0][:, 1].abs().max()) == 0


@pytest.mark.parametrize("bad, message", [([1.0, 0.0], r"shape \(4,\) or \(2, 4\)"), ([[2.0] * 4] * 2, "between 0"),
                                          ([float("nan")] * 4, "between 0")])
def test_bad_masks(checkpoints, bad, message):
    ours = kiln.from_pretrained(checkpoints("bert", "text-classification")[0], task="text-classification")
    with pytest.raises(InputError, match=message):
        ours(input_ids=torch.tensor(IDS), head_mask=torch.tensor(bad))


@pytest.fixture(scope="module")
def masked_artifacts(checkpoints, tmp_path_factory):
    """A classifier and a decoder exported with --head-mask (the classifier also with --output-attentions)."""
    root = tmp_path_factory.mktemp("head-mask")
    path, _ = checkpoints("bert", "text-classification")
    kiln.export(str(path), root / "clf", task="text-classification", head_mask=True, output_attentions=True,
                batch="1:4", seq="1:32")
    make_causal_lm(root / "llama", "llama", **TINY_LLAMA)
    kiln.export(str(root / "llama"), root / "gen", task="text-generation", head_mask=True, batch="1:4")
    return path, root


def test_export_adds_an_optional_input(masked_artifacts):
    path, root = masked_artifacts
    manifest = json.loads((root / "clf" / "kiln.json").read_text())
    assert manifest["validation"]["passed"]
    assert {"name": "head_mask", "dtype": "float32", "shape": [2, 4], "default": 1.0} in manifest["optional_inputs"]
    assert "head_mask" not in [t["name"] for t in manifest["inputs"]]
    engine = OnnxRuntimeEngine(root / "clf" / "model.onnx")
    feed = {"input_ids": np.array(IDS), "attention_mask": (np.array(IDS) != 0).astype(np.int64),
            "token_type_ids": np.zeros((2, 6), np.int64)}
    ours = kiln.from_pretrained(path, task="text-classification")
    with torch.no_grad():
        want = ours(**{k: torch.from_numpy(v) for k, v in feed.items()}, output_attentions=True)
        want_masked = ours(**{k: torch.from_numpy(v) for k, v in feed.items()}, head_mask=torch.tensor(MASK),
                           output_attentions=True)
    plain, masked = engine.run(feed), engine.run({**feed, "head_mask": np.array(MASK, np.float32)})
    np.testing.assert_allclose(plain["logits"], want["logits"].numpy(), atol=1e-5)  # the default keeps every head
    np.testing.assert_allclose(masked["logits"], want_masked["logits"].numpy(), atol=1e-5)
    assert np.abs(masked["attentions.0"][:, 1]).max() == 0  # a masked head's probabilities are zeros
    with pytest.raises(InputError, match="head_mask values must be between 0"):
        engine.run({**feed, "head_mask": np.full((2, 4), -1.0, np.float32)})
    gen = json.loads((root / "gen" / "kiln.json").read_text())
    assert [o["name"] for o in gen["optional_inputs"]] == ["logits_to_keep", "head_mask"]


def test_pipelines_feed_it_per_call(masked_artifacts):
    path, root = masked_artifacts
    pipe = kiln.pipeline("text-classification", root / "clf")
    masked = kiln.pipeline("text-classification", root / "clf", head_mask=MASK)
    text = "i love paris"
    assert pipe(text, head_mask=np.ones(4)) == pipe(text)
    assert masked(text) == pipe(text, head_mask=MASK) != pipe(text)
    with pytest.raises(InputError, match=r"shape \(4,\) or \(2, 4\)"):
        pipe(text, head_mask=[1, 0])
    plain = kiln.pipeline("text-classification", kiln.export(str(path), root / "plain", task="text-classification",
                                                             batch="1:4", seq="1:32") and root / "plain")
    with pytest.raises(InputError, match="takes no head_mask: export it with .* --head-mask"):
        plain(text, head_mask=MASK)


def test_the_decode_loop_feeds_it_every_step(masked_artifacts):
    """What the text-generation pipeline does with head_mask= (the tiny decoder here has no tokenizer)."""
    from kiln.runtime.generate import DecoderSession, GenerationConfig, generate

    _, root = masked_artifacts
    engine = OnnxRuntimeEngine(root / "gen" / "model.onnx")
    ids = np.array([[5, 6, 7, 8]])
    config = GenerationConfig(max_new_tokens=4)
    every = generate(DecoderSession(engine), ids, np.ones_like(ids), config)
    none_masked = generate(DecoderSession(engine, feed={"head_mask": np.ones((2, 4), np.float32)}), ids,
                           np.ones_like(ids), config)
    np.testing.assert_array_equal(every, none_masked)
    llama = kiln.from_pretrained(root / "llama", task="text-generation")
    masked_tokens = generate(DecoderSession(engine, feed={"head_mask": np.array(MASK, np.float32)}), ids,
                             np.ones_like(ids), config)
    with torch.no_grad():  # the reference's greedy tokens under the same mask
        seq = torch.tensor(ids)
        for _ in range(4):
            logits = llama(seq, head_mask=torch.tensor(MASK))["logits"][:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    np.testing.assert_array_equal(masked_tokens, seq[:, 4:].numpy())
