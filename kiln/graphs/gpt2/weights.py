"""Checkpoint key mapping for GPT-2: one table, kiln name <-> Hugging Face name.

GPT-2's c_attn, c_proj and c_fc are transformers ``Conv1D`` layers, whose weight is stored (in, out): the transpose
of nn.Linear's (out, in). Those weights are transposed on the way in and back on the way out.
"""

from __future__ import annotations

import re

from kiln.graphs.checkpoint import rename
from kiln.graphs.gpt2.config import GPT2Config

# Hugging Face names as GPT2Model has them; GPT2LMHeadModel nests the same under "transformer.".
TABLE = [
    ("embed", "wte"),
    ("pos_embed", "wpe"),
    ("layers.{i}.attn_norm", "h.{i}.ln_1"),
    ("layers.{i}.attn.qkv", "h.{i}.attn.c_attn"),
    ("layers.{i}.attn.o", "h.{i}.attn.c_proj"),
    ("layers.{i}.mlp_norm", "h.{i}.ln_2"),
    ("layers.{i}.mlp.fc", "h.{i}.mlp.c_fc"),
    ("layers.{i}.mlp.proj", "h.{i}.mlp.c_proj"),
    ("norm", "ln_f"),
]
HEAD = ("lm_head", "lm_head")  # outside the "transformer." prefix; only when not tied to the embedding
PREFIX = "transformer."
CONV1D = re.compile(r"^layers\.\d+\.(attn\.(qkv|o)|mlp\.(fc|proj))\.weight$")  # kiln names stored (in, out) by HF
# Buffers older checkpoints carry (the causal mask as `attn.bias`, and `attn.masked_bias`); kiln builds its own mask.
# GPT2DoubleHeadsModel's multiple-choice head is not part of text generation.
IGNORED = re.compile(r"\.attn\.(bias|masked_bias)$|^multiple_choice_head\.")


def _transpose_conv1d(state: dict) -> dict:
    return {k: v.t() if CONV1D.match(k) and v is not None else v for k, v in state.items()}


def hf_to_kiln(hf_state: dict, config: GPT2Config, task: str) -> tuple[dict, list[str]]:
    # GPT2LMHeadModel checkpoints say "transformer.h.0...", GPT2Model ones (the original "gpt2" on the hub) "h.0...".
    plain = {k.removeprefix(PREFIX): v for k, v in hf_state.items()}
    state, unused = rename(plain, [(hf, kiln) for kiln, hf in (*TABLE, HEAD)])
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding matrix is the head
    return _transpose_conv1d(state), [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: GPT2Config, task: str) -> dict:
    rules = [(kiln, PREFIX + hf) for kiln, hf in TABLE] + [HEAD]
    out, unmatched = rename(_transpose_conv1d(state), rules)
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
