"""BERT family: BERT, RoBERTa, XLM-RoBERTa, DistilBERT and the MiniLM checkpoints."""

from __future__ import annotations

import importlib

from kiln.graphs.bert import weights
from kiln.graphs.bert.config import BertConfig

TASKS = ("feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask")
# Sibling references with the same classes and parameter names: model_torch.py, model_jax.py, model_tf.py.
FRAMEWORKS = ("torch", "jax", "tf")


def build(raw_config: dict, task: str, hf_state: dict, attn_impl: str = "sdpa", framework: str = "torch"):
    """The ``framework`` reference for ``task`` with the checkpoint's weights loaded and checked."""
    from kiln.graphs.checkpoint import attach_weights

    models = importlib.import_module(f"kiln.graphs.bert.model_{framework}")
    config = BertConfig.from_dict(raw_config)
    state, unused = weights.hf_to_kiln(hf_state, config, task)
    if task == "feature-extraction":
        model = models.BertModel(config, add_pooler="pooler.weight" in state, attn_impl=attn_impl)
    else:
        model = models.TASK_MODELS[task](config, attn_impl=attn_impl)
    return attach_weights(model, weights, state, unused, task)
