"""BERT family: BERT, RoBERTa, XLM-RoBERTa, DistilBERT and the MiniLM checkpoints."""

from __future__ import annotations

from kiln.graphs.bert import weights
from kiln.graphs.bert.config import BertConfig

TASKS = ("feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask")


def build(raw_config: dict, task: str, hf_state: dict, attn_impl: str = "sdpa"):
    """The torch reference for ``task`` with the checkpoint's weights loaded and checked."""
    from kiln.graphs.bert.model_torch import TASK_MODELS, BertModel
    from kiln.graphs.checkpoint import attach_weights

    config = BertConfig.from_dict(raw_config)
    state, unused = weights.hf_to_kiln(hf_state, config, task)
    if task == "feature-extraction":
        model = BertModel(config, add_pooler="pooler.weight" in state, attn_impl=attn_impl)
    else:
        model = TASK_MODELS[task](config, attn_impl=attn_impl)
    return attach_weights(model, weights, state, unused, task)
