"""ModernBERT exports for every task with one fused Attention node per layer (local layers included: their window is
in the mask), validates on padded batches longer than the window, and its pipelines match transformers'."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import kiln
from kiln.artifact import load_manifest
from kiln.runtime.engines import group_outputs
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

TASKS = {"feature-extraction": "ModernBertModel", "fill-mask": "ModernBertForMaskedLM",
         "text-classification": "ModernBertForSequenceClassification",
         "token-classification": "ModernBertForTokenClassification",
         "question-answering": "ModernBertForQuestionAnswering"}
AGREEMENT = {"feature-extraction": "min_cosine", "text-classification": "label_agreement",
             "token-classification": "token_agreement", "fill-mask": "token_agreement",
             "question-answering": "span_agreement"}
LAYERS = 3  # global, local, local
LABELS = {"text-classification": ["NEGATIVE", "NEUTRAL", "POSITIVE"],
          "token-classification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}
TEXTS = ["the capital of france is [MASK].", "hello [MASK], i love paris and the river runs through it"]


def make_checkpoint(path, task: str, **overrides):
    """A tiny random transformers ModernBERT with conftest's BERT tokenizer ([MASK], [PAD] = 0): window 4 (two
    tokens each side), so the validator's 16- and 32-token feeds reach past it. Initialised wide (0.3) so that
    fill-mask's best tokens are not near ties."""
    import transformers
    from conftest import bert_tokenizer

    tokenizer = bert_tokenizer()
    labels = LABELS.get(task, ["LABEL_0", "LABEL_1"])
    config = transformers.ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=40, local_attention=4, max_position_embeddings=64, initializer_range=0.3,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, cls_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id, id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, **overrides)
    torch.manual_seed(0)
    model = getattr(transformers, TASKS[task])(config)
    with torch.no_grad():  # random init leaves norms at identity and biases at 0: perturb them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, artifact) per task, built and exported once."""
    cache = {}

    def get(task: str):
        if task not in cache:
            root = tmp_path_factory.mktemp(f"modernbert-{task}")
            make_checkpoint(root / "checkpoint", task)
            kiln.export(str(root / "checkpoint"), root / "artifact", task=task, batch="1:4", seq="1:32")
            cache[task] = root / "checkpoint", root / "artifact"
        return cache[task]

    return get


@pytest.mark.parametrize("task", list(TASKS))
def test_task_exports_and_validates(task, exported):
    _, out = exported(task)
    manifest = load_manifest(out)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert Counter(n.op_type for n in graph.node)["Attention"] == LAYERS
    assert manifest["validation"]["passed"]
    metric = AGREEMENT[task]
    assert manifest["validation"]["task"][metric] >= manifest["validation"]["task"]["gate"]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]  # no token_type_ids
    assert manifest["model_type"] == "modernbert" and manifest["architecture"] == TASKS[task]


@pytest.mark.parametrize("task", ["fill-mask", "text-classification"])
def test_pipeline_matches_transformers(task, exported):
    """kiln.pipeline on the artifact vs transformers.pipeline on the checkpoint, within 1e-4 (assert_same)."""
    import transformers
    from conftest import assert_same

    path, out = exported(task)
    ours = kiln.pipeline(task, out, batch_size=2)  # one padded batch
    theirs = transformers.pipeline(task, model=str(path), tokenizer=str(path), device="cpu")
    texts = TEXTS if task == "fill-mask" else [t.replace(" [MASK]", "") for t in TEXTS]
    kwargs = {"top_k": 3} if task == "fill-mask" else {"top_k": None}
    assert_same(ours(texts, **kwargs), theirs(texts, **kwargs))
    assert_same(ours(texts[0], **kwargs), theirs(texts[0], **kwargs))


def test_hidden_states_and_attentions_as_outputs(exported, tmp_path):
    """--output-hidden-states/--output-attentions: still one node per layer, and on a padded batch longer than the
    window the real tokens' states and attention rows equal transformers' eager ones."""
    import transformers

    path, _ = exported("text-classification")
    out = tmp_path / "art"
    manifest = kiln.export(str(path), out, task="text-classification", batch="1:4", seq="1:32",
                           output_hidden_states=True, output_attentions=True)
    assert manifest["validation"]["passed"]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert Counter(n.op_type for n in graph.node)["Attention"] == LAYERS
    ids = np.array([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 3], [2, 50, 51, 3, 0, 0, 0, 0, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    got = group_outputs(OnnxRuntimeEngine(out / "model.onnx").run({"input_ids": ids, "attention_mask": mask}))
    eager = transformers.ModernBertForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = eager(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True,
                    output_attentions=True)
    real = mask.astype(bool)
    np.testing.assert_allclose(got["logits"], ref.logits.numpy(), atol=1e-5)
    assert len(got["hidden_states"]) == LAYERS + 1 and len(got["attentions"]) == LAYERS
    for a, b in zip(got["hidden_states"], ref.hidden_states):
        np.testing.assert_allclose(a[real], b.numpy()[real], atol=1e-5)
    for a, b in zip(got["attentions"], ref.attentions):  # (B, H, T, S): the rows of real queries
        np.testing.assert_allclose(a.transpose(0, 2, 1, 3)[real], b.numpy().transpose(0, 2, 1, 3)[real], atol=1e-5)


def test_head_mask_is_refused_clearly(exported, tmp_path):
    from kiln.errors import InputError

    path, _ = exported("text-classification")
    with pytest.raises(InputError, match="modernbert models take no head mask"):
        kiln.export(str(path), tmp_path / "art", task="text-classification", head_mask=True)
    assert not (tmp_path / "art").exists()
