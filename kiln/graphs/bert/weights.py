"""Checkpoint key mapping for the BERT family: one table, kiln name <-> Hugging Face name."""

from __future__ import annotations

import re

from kiln.graphs.bert.config import BertConfig
from kiln.graphs.checkpoint import rename

# kiln parameter prefix -> Hugging Face prefix (relative to the base model); each gets .weight and .bias.
TABLE = [
    ("embeddings.word", "embeddings.word_embeddings"),
    ("embeddings.position", "embeddings.position_embeddings"),
    ("embeddings.token_type", "embeddings.token_type_embeddings"),
    ("embeddings.norm", "embeddings.LayerNorm"),
    ("layers.{i}.attn.q", "encoder.layer.{i}.attention.self.query"),
    ("layers.{i}.attn.k", "encoder.layer.{i}.attention.self.key"),
    ("layers.{i}.attn.v", "encoder.layer.{i}.attention.self.value"),
    ("layers.{i}.attn.o", "encoder.layer.{i}.attention.output.dense"),
    ("layers.{i}.attn_norm", "encoder.layer.{i}.attention.output.LayerNorm"),
    ("layers.{i}.mlp.up", "encoder.layer.{i}.intermediate.dense"),
    ("layers.{i}.mlp.down", "encoder.layer.{i}.output.dense"),
    ("layers.{i}.mlp_norm", "encoder.layer.{i}.output.LayerNorm"),
    ("pooler", "pooler.dense"),
]
DISTILBERT_TABLE = [
    ("embeddings.word", "embeddings.word_embeddings"),
    ("embeddings.position", "embeddings.position_embeddings"),
    ("embeddings.norm", "embeddings.LayerNorm"),
    ("layers.{i}.attn.q", "transformer.layer.{i}.attention.q_lin"),
    ("layers.{i}.attn.k", "transformer.layer.{i}.attention.k_lin"),
    ("layers.{i}.attn.v", "transformer.layer.{i}.attention.v_lin"),
    ("layers.{i}.attn.o", "transformer.layer.{i}.attention.out_lin"),
    ("layers.{i}.attn_norm", "transformer.layer.{i}.sa_layer_norm"),
    ("layers.{i}.mlp.up", "transformer.layer.{i}.ffn.lin1"),
    ("layers.{i}.mlp.down", "transformer.layer.{i}.ffn.lin2"),
    ("layers.{i}.mlp_norm", "transformer.layer.{i}.output_layer_norm"),
]
# Layouts (config.layout, from the model type's variant): BERT; RoBERTa and XLM-RoBERTa (same weights, "roberta."
# nesting); DistilBERT.
BASE_TABLE = {"bert": TABLE, "roberta": TABLE, "distilbert": DISTILBERT_TABLE}
BASE_PREFIX = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert."}
# Task heads sit beside the base model, which task checkpoints nest under the prefix. The masked-LM decoder weight
# is tied to the word embeddings, so only its bias is a head parameter here.
HEADS = {
    ("bert", "text-classification"): [("classifier", "classifier")],
    ("roberta", "text-classification"): [("classifier.dense", "classifier.dense"), ("classifier.out", "classifier.out_proj")],
    ("distilbert", "text-classification"): [("classifier.dense", "pre_classifier"), ("classifier.out", "classifier")],
    **{(f, "token-classification"): [("classifier", "classifier")] for f in BASE_TABLE},
    **{(f, "question-answering"): [("qa_outputs", "qa_outputs")] for f in BASE_TABLE},
    ("bert", "fill-mask"): [("lm_head.dense", "cls.predictions.transform.dense"),
                            ("lm_head.norm", "cls.predictions.transform.LayerNorm"), ("lm_head", "cls.predictions")],
    ("roberta", "fill-mask"): [("lm_head.dense", "lm_head.dense"), ("lm_head.norm", "lm_head.layer_norm"),
                               ("lm_head", "lm_head")],
    ("distilbert", "fill-mask"): [("lm_head.dense", "vocab_transform"), ("lm_head.norm", "vocab_layer_norm"),
                                  ("lm_head", "vocab_projector")],
}
# Buffers, tied copies and heads of other tasks that a checkpoint may carry and kiln does not use.
IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids)$|^(cls|lm_head|qa_outputs|classifier|pre_classifier|"
                     r"vocab_transform|vocab_layer_norm|vocab_projector)\.|(^|\.)decoder\.(weight|bias)$")
# Checkpoints converted from the original TensorFlow BERT name LayerNorm parameters gamma/beta.
LEGACY = {".gamma": ".weight", ".beta": ".bias"}


def _rules(config: BertConfig, task: str) -> list[tuple[str, str]]:
    """(kiln prefix, HF prefix) pairs for this model and task, full names from the top of each model."""
    family = config.layout
    if task == "feature-extraction":  # BertModel/RobertaModel: no nesting on either side
        return list(BASE_TABLE[family])
    base = BASE_PREFIX[family]
    return [("bert." + k, base + h) for k, h in BASE_TABLE[family]] + HEADS[(family, task)]


def hf_to_kiln(hf_state: dict, config: BertConfig, task: str) -> tuple[dict, list[str]]:
    """Rename a Hugging Face state dict to kiln names. Returns (state, HF keys kiln does not use)."""
    fixed = {}
    for key, value in hf_state.items():
        for old, new in LEGACY.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        fixed[key] = value
    rules, prefix = _rules(config, task), BASE_PREFIX[config.layout]
    nested = any(k.startswith(prefix) for k in fixed)
    if task != "feature-extraction" and not nested:
        # A base-model checkpoint (no "bert." nesting) loaded under a task head: transformers accepts it too.
        rules = [(k, h.removeprefix(prefix)) for k, h in rules]
    elif task == "feature-extraction" and nested:
        # A task checkpoint used for its encoder only.
        rules = [(k, prefix + h) for k, h in rules]
    state, unused = rename(fixed, [(h, k) for k, h in rules])
    return state, [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: BertConfig, task: str) -> dict:
    """The inverse: kiln names to the keys transformers writes for the same model class."""
    out, unmatched = rename(state, _rules(config, task))
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
