"""GPT-2 (model_type "gpt2"): openai-community/gpt2 and its sizes, DistilGPT2, and checkpoints fine-tuned from them."""

from __future__ import annotations

from kiln.graphs.gpt2 import weights
from kiln.graphs.gpt2.config import GPT2Config

TASKS = ("text-generation",)


def build(raw_config: dict, task: str, hf_state: dict, attn_impl: str = "sdpa"):
    import logging

    from kiln.graphs.checkpoint import load_weights
    from kiln.graphs.gpt2.model_torch import GPT2LMHeadModel

    config = GPT2Config.from_dict(raw_config)
    state, unused = weights.hf_to_kiln(hf_state, config, task)
    model = GPT2LMHeadModel(config, attn_impl=attn_impl)
    if unused:
        logging.getLogger("kiln").warning("Unused checkpoint tensors: %s", ", ".join(unused[:8]))
    names = weights.kiln_to_hf({k: None for k in model.state_dict()}, config, task)
    hf_name = dict(zip(model.state_dict(), names)).get
    load_weights(model, state, lambda n: hf_name(n, n))
    model.task = task
    return model
