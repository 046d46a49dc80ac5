"""The registry (kiln/graphs/registry.py): one record per family, found by looking; every record's model classes and
frameworks exist; a model type is added by one entry in its family's VARIANTS (CamemBERT, read as RoBERTa: checked
against transformers here, export included)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import ConfigError, InputError
from kiln.graphs import registry


def test_every_family_is_a_record_with_what_it_names():
    families = {arch.family: arch for arch in registry.architectures()}
    assert set(families) == {"bert", "clip", "deberta_v2", "dinov2", "gemma", "gpt2", "llama", "modernbert", "siglip", "vit", "whisper"}
    model_types = [m for arch in families.values() for m in arch.variants]
    assert len(model_types) == len(set(model_types))  # a model type belongs to one family
    for arch in families.values():
        assert set(arch.tasks) <= set(kiln.TASKS)
        for framework in arch.frameworks:
            models = importlib.import_module(f"kiln.graphs.{arch.family}.model_{framework}")
            for kiln_class, _ in arch.tasks.values():
                assert hasattr(models, kiln_class), (arch.family, framework, kiln_class)
        assert arch.spec in ("text-encoder", "vision-encoder", "decoder", "speech-seq2seq", "dual-encoder")


def test_lookups_name_what_is_supported():
    with pytest.raises(ConfigError, match="model_type 't5' is not supported by kiln yet.*bert, camembert, clip, deberta-v2, dinov2, distilbert"):
        registry.architecture({"model_type": "t5"})
    with pytest.raises(ConfigError, match="has no 'model_type'"):
        registry.architecture({})
    with pytest.raises(ConfigError, match="Task 'fill-mask' is not supported for model_type 'llama'.*text-generation"):
        registry.check_task({"model_type": "llama"}, "fill-mask")
    arch = registry.architecture({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="has a reference in torch only, not jax"):
        arch.check_framework("gpt2", "jax")
    with pytest.raises(InputError, match="Unknown framework 'mxnet'"):
        arch.check_framework("gpt2", "mxnet")
    assert arch.hf_class("gpt2", "text-generation") == "GPT2LMHeadModel"
    assert registry.architecture({"model_type": "xlm-roberta"}).hf_class("xlm-roberta", "fill-mask") == \
        "XLMRobertaForMaskedLM"


def test_a_variant_added_by_one_entry(tmp_path):
    """CamemBERT is RoBERTa under another model_type and class names: its one VARIANTS entry is all kiln needs."""
    import transformers

    from conftest import roberta_tokenizer

    tokenizer = roberta_tokenizer()
    config = transformers.AutoConfig.for_model("camembert", vocab_size=len(tokenizer), hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                               max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id,
                                               type_vocab_size=1, num_labels=3)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    theirs.save_pretrained(tmp_path / "camembert")
    tokenizer.save_pretrained(tmp_path / "camembert")
    ours = kiln.from_pretrained(tmp_path / "camembert", task="text-classification")
    ids = torch.tensor([[0, 15, 27, 33, 2, 1], [0, 40, 41, 2, 1, 1]])
    mask = (ids != tokenizer.pad_token_id).long()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask)["logits"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "saved")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "saved").architectures == \
        ["CamembertForSequenceClassification"]
    manifest = kiln.export(str(tmp_path / "camembert"), tmp_path / "artifact", task="text-classification",
                           batch="1:4", seq="1:32")
    assert manifest["validation"]["passed"] and manifest["model_type"] == "camembert"
    pipe = kiln.pipeline("text-classification", tmp_path / "artifact")
    ref = transformers.pipeline("text-classification", model=str(tmp_path / "camembert"))
    text = "i love paris"
    assert pipe(text)[0]["label"] == ref(text)[0]["label"]
    assert np.isclose(pipe(text)[0]["score"], ref(text)[0]["score"], atol=1e-5)
