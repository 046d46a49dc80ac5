"""Checkpoint key mapping for the Gemma family: one table, kiln name <-> Hugging Face name."""

from __future__ import annotations

import re

from kiln.graphs.checkpoint import rename
from kiln.graphs.gemma.config import GemmaConfig

TABLE = [
    ("embed", "model.embed_tokens"),
    ("layers.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
    ("layers.{i}.attn.q", "model.layers.{i}.self_attn.q_proj"),
    ("layers.{i}.attn.k", "model.layers.{i}.self_attn.k_proj"),
    ("layers.{i}.attn.v", "model.layers.{i}.self_attn.v_proj"),
    ("layers.{i}.attn.o", "model.layers.{i}.self_attn.o_proj"),
    ("layers.{i}.attn.q_norm", "model.layers.{i}.self_attn.q_norm"),  # Gemma 3
    ("layers.{i}.attn.k_norm", "model.layers.{i}.self_attn.k_norm"),
    ("layers.{i}.post_attn_norm", "model.layers.{i}.post_attention_layernorm"),
    ("layers.{i}.mlp_norm", "model.layers.{i}.pre_feedforward_layernorm"),
    ("layers.{i}.post_mlp_norm", "model.layers.{i}.post_feedforward_layernorm"),
    ("layers.{i}.mlp.gate", "model.layers.{i}.mlp.gate_proj"),
    ("layers.{i}.mlp.up", "model.layers.{i}.mlp.up_proj"),
    ("layers.{i}.mlp.down", "model.layers.{i}.mlp.down_proj"),
    ("norm", "model.norm"),
    ("lm_head", "lm_head"),
]
# Rotary caches some converters store; kiln recomputes them.
IGNORED = re.compile(r"rotary_emb\.\w*inv_freq$")


# Copied from graphs.llama.weights (hf_to_kiln, kiln_to_hf), over Gemma's table
def hf_to_kiln(hf_state: dict, config: GemmaConfig, task: str) -> tuple[dict, list[str]]:
    state, unused = rename(hf_state, [(hf, kiln) for kiln, hf in TABLE])
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding matrix is the head
    return state, [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: GemmaConfig, task: str) -> dict:
    out, unmatched = rename(state, TABLE)
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
