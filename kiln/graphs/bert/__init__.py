"""BERT family: BERT, RoBERTa, XLM-RoBERTa, DistilBERT and the MiniLM checkpoints."""

from __future__ import annotations

from kiln.graphs.bert import weights
from kiln.graphs.bert.config import BertConfig

TASKS = ("feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask")


def build(raw_config: dict, task: str, hf_state: dict, attn_impl: str = "sdpa"):
    """The torch reference for ``task`` with the checkpoint's weights loaded and checked."""
    import logging

    from kiln.graphs.bert.model_torch import TASK_MODELS, BertModel
    from kiln.graphs.checkpoint import load_weights

    config = BertConfig.from_dict(raw_config)
    state, unused = weights.hf_to_kiln(hf_state, config, task)
    if task == "feature-extraction":
        model = BertModel(config, add_pooler="pooler.weight" in state, attn_impl=attn_impl)
    else:
        model = TASK_MODELS[task](config, attn_impl=attn_impl)
    if unused:
        logging.getLogger("kiln").warning("Unused checkpoint tensors: %s", ", ".join(unused[:8]))
    names = weights.kiln_to_hf({k: None for k in model.state_dict()}, config, task)
    hf_name = dict(zip(model.state_dict(), names)).get
    load_weights(model, state, lambda n: hf_name(n, n))
    model.task = task
    return model
