"""GPT-2 (model_type "gpt2"): openai-community/gpt2 and its sizes, DistilGPT2, and checkpoints fine-tuned from them."""

from __future__ import annotations

from kiln.graphs.gpt2 import weights
from kiln.graphs.gpt2.config import GPT2Config

TASKS = ("text-generation",)


FRAMEWORKS = ("torch",)  # no JAX/TensorFlow sibling yet


def build(raw_config: dict, task: str, hf_state: dict, attn_impl: str = "sdpa", framework: str = "torch"):
    from kiln.graphs.checkpoint import attach_weights
    from kiln.graphs.gpt2.model_torch import GPT2LMHeadModel

    config = GPT2Config.from_dict(raw_config)
    state, unused = weights.hf_to_kiln(hf_state, config, task)
    model = GPT2LMHeadModel(config, attn_impl=attn_impl)
    return attach_weights(model, weights, state, unused, task)
