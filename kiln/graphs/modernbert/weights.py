"""Checkpoint key mapping for ModernBERT: one table, kiln name <-> Hugging Face name."""

from __future__ import annotations

import re

from kiln.graphs.checkpoint import rename
from kiln.graphs.modernbert.config import ModernBertConfig

# kiln parameter prefix -> Hugging Face prefix (relative to the base model); each gets .weight and, where the config
# gives the layer one, .bias. Layer 0 has no attn_norm (the embeddings' norm precedes it).
TABLE = [
    ("embeddings.word", "embeddings.tok_embeddings"),
    ("embeddings.norm", "embeddings.norm"),
    ("layers.{i}.attn_norm", "layers.{i}.attn_norm"),
    ("layers.{i}.attn.qkv", "layers.{i}.attn.Wqkv"),
    ("layers.{i}.attn.o", "layers.{i}.attn.Wo"),
    ("layers.{i}.mlp_norm", "layers.{i}.mlp_norm"),
    ("layers.{i}.mlp.up", "layers.{i}.mlp.Wi"),  # input and gate, stacked: (2 * intermediate, hidden)
    ("layers.{i}.mlp.down", "layers.{i}.mlp.Wo"),
    ("final_norm", "final_norm"),
]
PREFIX = "model."  # where task checkpoints nest the base model
# Task heads sit beside the base model. Every head but question answering's starts with the prediction head (dense,
# activation, norm); the masked-LM decoder's weight is the token embedding matrix unless tie_word_embeddings is false.
HEAD = [("head.dense", "head.dense"), ("head.norm", "head.norm")]
HEADS = {
    "fill-mask": HEAD + [("decoder", "decoder")],
    "text-classification": HEAD + [("classifier", "classifier")],
    "token-classification": HEAD + [("classifier", "classifier")],
    "question-answering": HEAD + [("classifier", "classifier")],
}
# Heads of other tasks, and the masked-LM decoder's tied copy of the embeddings, that a checkpoint may carry.
IGNORED = re.compile(r"^(head|decoder|classifier)\.")


def _rules(task: str) -> list[tuple[str, str]]:
    """(kiln prefix, HF prefix) pairs for this task's model, full names from the top of each model."""
    if task == "feature-extraction":  # ModernBertModel: no nesting on either side
        return list(TABLE)
    return [(PREFIX + k, PREFIX + h) for k, h in TABLE] + HEADS[task]


def hf_to_kiln(hf_state: dict, config: ModernBertConfig, task: str) -> tuple[dict, list[str]]:
    """Rename a Hugging Face state dict to kiln names. Returns (state, HF keys kiln does not use)."""
    rules = _rules(task)
    nested = any(k.startswith(PREFIX) for k in hf_state)
    if task != "feature-extraction" and not nested:
        # A base-model checkpoint loaded under a task head: transformers accepts it too (the head is then missing).
        rules = [(k, h.removeprefix(PREFIX)) for k, h in rules]
    elif task == "feature-extraction" and nested:
        # A task checkpoint used for its encoder only.
        rules = [(k, PREFIX + h) for k, h in rules]
    state, unused = rename(hf_state, [(h, k) for k, h in rules])
    if task == "fill-mask" and config.tie_word_embeddings:
        state.pop("decoder.weight", None)  # a tied copy of the embeddings, where the checkpoint stores one
    return state, [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: ModernBertConfig, task: str) -> dict:
    """The inverse: kiln names to the keys transformers writes for the same model class."""
    out, unmatched = rename(state, _rules(task))
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
