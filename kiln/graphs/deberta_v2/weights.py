"""Checkpoint key mapping for DeBERTa-v2/v3: one table, kiln name <-> Hugging Face name."""

from __future__ import annotations

import re

from kiln.graphs.checkpoint import rename
from kiln.graphs.deberta_v2.config import DebertaV2Config

# kiln parameter prefix -> Hugging Face prefix (relative to the base model); each gets .weight and .bias.
TABLE = [
    ("embeddings.word", "embeddings.word_embeddings"),
    ("embeddings.position", "embeddings.position_embeddings"),
    ("embeddings.token_type", "embeddings.token_type_embeddings"),
    ("embeddings.proj", "embeddings.embed_proj"),
    ("embeddings.norm", "embeddings.LayerNorm"),
    ("layers.{i}.attn.q", "encoder.layer.{i}.attention.self.query_proj"),
    ("layers.{i}.attn.k", "encoder.layer.{i}.attention.self.key_proj"),
    ("layers.{i}.attn.v", "encoder.layer.{i}.attention.self.value_proj"),
    ("layers.{i}.attn.pos_k", "encoder.layer.{i}.attention.self.pos_key_proj"),
    ("layers.{i}.attn.pos_q", "encoder.layer.{i}.attention.self.pos_query_proj"),
    ("layers.{i}.attn.o", "encoder.layer.{i}.attention.output.dense"),
    ("layers.{i}.attn.norm", "encoder.layer.{i}.attention.output.LayerNorm"),
    ("layers.{i}.up", "encoder.layer.{i}.intermediate.dense"),
    ("layers.{i}.down", "encoder.layer.{i}.output.dense"),
    ("layers.{i}.mlp_norm", "encoder.layer.{i}.output.LayerNorm"),
    ("rel_embeddings", "encoder.rel_embeddings"),
    ("rel_norm", "encoder.LayerNorm"),
    ("conv.conv", "encoder.conv.conv"),
    ("conv.norm", "encoder.conv.LayerNorm"),
]
PREFIX = "deberta."
# Task heads sit beside the base model, which task checkpoints nest under "deberta.". The masked-LM decoder is the
# word embedding matrix (tied), so only its bias is a head parameter; ``legacy`` picks the head's names.
HEADS = {
    "text-classification": [("pooler", "pooler.dense"), ("classifier", "classifier")],
    "token-classification": [("classifier", "classifier")],
    "question-answering": [("qa_outputs", "qa_outputs")],
}
MASKED_LM = {
    True: [("lm_head.dense", "cls.predictions.transform.dense"), ("lm_head.norm", "cls.predictions.transform.LayerNorm"),
           ("lm_head", "cls.predictions")],
    False: [("lm_head.dense", "lm_predictions.lm_head.dense"), ("lm_head.norm", "lm_predictions.lm_head.LayerNorm"),
            ("lm_head", "lm_predictions.lm_head")],
}
# Buffers, tied copies, absolute positions a v3 checkpoint carries unused, and heads of other tasks (the replaced-token
# detection head v3 was trained with, "mask_predictions").
IGNORED = re.compile(r"(^|\.)position_ids$|^(cls|lm_predictions|mask_predictions|pooler|classifier|qa_outputs|"
                     r"lm_head)\.|(^|\.)decoder\.(weight|bias)$|embeddings\.position_embeddings\.weight$")


def _rules(config: DebertaV2Config, task: str) -> list[tuple[str, str]]:
    if task == "feature-extraction":
        return list(TABLE)
    head = MASKED_LM[config.legacy] if task == "fill-mask" else HEADS[task]
    return [("deberta." + k, PREFIX + h) for k, h in TABLE] + head


def hf_to_kiln(hf_state: dict, config: DebertaV2Config, task: str) -> tuple[dict, list[str]]:
    """Rename a Hugging Face state dict to kiln names. Returns (state, HF keys kiln does not use)."""
    rules = _rules(config, task)
    nested = any(k.startswith(PREFIX) for k in hf_state)
    if task != "feature-extraction" and not nested:  # a base checkpoint under a task head, as transformers allows
        rules = [(k, h.removeprefix(PREFIX)) for k, h in rules]
    elif task == "feature-extraction" and nested:  # a task checkpoint used for its encoder only
        rules = [(k, PREFIX + h) for k, h in rules]
    state, unused = rename(hf_state, [(h, k) for k, h in rules])
    return state, [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: DebertaV2Config, task: str) -> dict:
    """The inverse: kiln names to the keys transformers writes for the same model class."""
    out, unmatched = rename(state, _rules(config, task))
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
