"""Checkpoint key mapping for Whisper: one table, kiln name <-> Hugging Face name (WhisperForConditionalGeneration's).

transformers' WhisperModel keeps the same names without the "model." prefix; both are read.
"""

from __future__ import annotations

import re

from kiln.graphs.checkpoint import rename
from kiln.graphs.whisper.config import WhisperConfig

_ATTENTION = [("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")]
TABLE = [
    ("encoder.conv1", "model.encoder.conv1"),
    ("encoder.conv2", "model.encoder.conv2"),
    ("encoder.pos_embed", "model.encoder.embed_positions"),
    *[(f"encoder.layers.{{i}}.attn.{k}", f"model.encoder.layers.{{i}}.self_attn.{hf}") for k, hf in _ATTENTION],
    ("encoder.layers.{i}.attn_norm", "model.encoder.layers.{i}.self_attn_layer_norm"),
    ("encoder.layers.{i}.mlp.fc1", "model.encoder.layers.{i}.fc1"),
    ("encoder.layers.{i}.mlp.fc2", "model.encoder.layers.{i}.fc2"),
    ("encoder.layers.{i}.mlp_norm", "model.encoder.layers.{i}.final_layer_norm"),
    ("encoder.norm", "model.encoder.layer_norm"),
    ("decoder.embed", "model.decoder.embed_tokens"),
    ("decoder.pos_embed", "model.decoder.embed_positions"),
    *[(f"decoder.layers.{{i}}.attn.{k}", f"model.decoder.layers.{{i}}.self_attn.{hf}") for k, hf in _ATTENTION],
    ("decoder.layers.{i}.attn_norm", "model.decoder.layers.{i}.self_attn_layer_norm"),
    *[(f"decoder.layers.{{i}}.cross.{k}", f"model.decoder.layers.{{i}}.encoder_attn.{hf}") for k, hf in _ATTENTION],
    ("decoder.layers.{i}.cross_norm", "model.decoder.layers.{i}.encoder_attn_layer_norm"),
    ("decoder.layers.{i}.mlp.fc1", "model.decoder.layers.{i}.fc1"),
    ("decoder.layers.{i}.mlp.fc2", "model.decoder.layers.{i}.fc2"),
    ("decoder.layers.{i}.mlp_norm", "model.decoder.layers.{i}.final_layer_norm"),
    ("decoder.norm", "model.decoder.layer_norm"),
    ("proj_out", "proj_out"),  # only when not tied to decoder.embed
]
PREFIX = "model."
# Training-only parameters: the weighted layer sum of WhisperForAudioClassification (refused by the config) and
# SpecAugment's learned mask embedding.
IGNORED = re.compile(r"^(model\.)?encoder\.masked_spec_embed$|^layer_weights$")


def hf_to_kiln(hf_state: dict, config: WhisperConfig, task: str) -> tuple[dict, list[str]]:
    # WhisperModel checkpoints say "encoder.layers.0...", WhisperForConditionalGeneration ones "model.encoder...".
    original = {k if k.startswith(PREFIX) or k.startswith("proj_out.") else PREFIX + k: k for k in hf_state}
    state, unused = rename({name: hf_state[k] for name, k in original.items()}, [(hf, kiln) for kiln, hf in TABLE])
    if config.tie_word_embeddings:
        state.pop("proj_out.weight", None)  # tied: the token embedding is the head
    return state, [original[k] for k in unused if not IGNORED.search(original[k])]


def kiln_to_hf(state: dict, config: WhisperConfig, task: str) -> dict:
    out, unmatched = rename(state, TABLE)
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
