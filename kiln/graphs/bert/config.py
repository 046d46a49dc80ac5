"""BERT-family configuration: BERT, RoBERTa and the MiniLM checkpoints, read from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kiln.errors import ConfigError
from kiln.graphs.config_fields import check_eps, check_problem_type, read_id2label
from kiln.graphs.heads import read_pruned_heads
from kiln.graphs.registry import Variant

# The model types this family reads. "layout" names the weight layout and heads (weights.py, the task models);
# RoBERTa numbers positions from padding_idx + 1 (fairseq's make_positions), BERT from 0; DistilBERT names the
# hyper-parameters differently and has no token types.
DISTILBERT_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                    "hidden_dim": "intermediate_size", "activation": "hidden_act"}
VARIANTS = {
    "bert": Variant("Bert", {"layout": "bert"}),
    "roberta": Variant("Roberta", {"layout": "roberta", "positions_after_pad": True}),
    "xlm-roberta": Variant("XLMRoberta", {"layout": "roberta", "positions_after_pad": True}),
    "camembert": Variant("Camembert", {"layout": "roberta", "positions_after_pad": True}),
    "distilbert": Variant("DistilBert", {"layout": "distilbert", "renamed": DISTILBERT_NAMES,
                                         "fixed": {"type_vocab_size": 0, "layer_norm_eps": 1e-12}}),
}
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "tanh")


@dataclass(frozen=True)
class BertConfig:
    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: str | None = None
    pruned_heads: dict = field(default_factory=dict)  # layer -> heads removed (indices in the unpruned layer)
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read, written back unchanged

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    heads_per_group = 1  # every head has its own key and value

    def heads_in_layer(self, layer: int) -> int:
        return self.num_attention_heads - len(self.pruned_heads.get(layer, ()))

    @property
    def variant(self) -> Variant:
        return VARIANTS.get(self.model_type, VARIANTS["bert"])

    @property
    def layout(self) -> str:
        """bert | roberta | distilbert: the weight layout and task heads of this model type."""
        return self.variant["layout"]

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def position_offset(self) -> int:
        return self.pad_token_id + 1 if self.variant.get("positions_after_pad") else 0

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_dict(cls, raw: dict) -> "BertConfig":
        known = {name for name in cls.__dataclass_fields__ if name not in ("raw", "pruned_heads")}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        variant = VARIANTS.get(raw.get("model_type"), VARIANTS["bert"])
        renamed = variant.get("renamed", {})
        values.update({ours: raw[theirs] for theirs, ours in renamed.items() if raw.get(theirs) is not None})
        values.update(variant.get("fixed", {}))
        labels = read_id2label(raw)
        if labels is not None:
            values["id2label"] = labels
        config = cls(**values, raw=dict(raw))
        config.validate()
        pruned = read_pruned_heads(raw, config.num_hidden_layers, config.num_attention_heads)
        return dataclasses.replace(config, pruned_heads=pruned) if pruned else config

    def validate(self) -> None:
        ints = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")
        for name in ints:
            value = getattr(self, name)
            least = 0 if name == "type_vocab_size" else 1  # DistilBERT has no token type embeddings
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"config.json '{name}' must be a positive integer, got {value!r}.")
            if value > 1 << 24:
                raise ConfigError(f"config.json '{name}' = {value} is implausibly large; the file looks corrupt.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"config.json 'hidden_size' ({self.hidden_size}) must be divisible by "
                              f"'num_attention_heads' ({self.num_attention_heads}).")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"config.json 'hidden_act' {self.hidden_act!r} is not supported; use one of {ACTIVATIONS}.")
        if self.position_embedding_type != "absolute":
            raise ConfigError(f"position_embedding_type {self.position_embedding_type!r} is not supported; kiln "
                              "implements 'absolute' position embeddings only.")
        check_problem_type(self.problem_type)
        check_eps("layer_norm_eps", self.layer_norm_eps)
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"config.json 'pad_token_id' must be a token id below vocab_size, got {self.pad_token_id!r}.")
        if self.max_sequence_length < 1:  # RoBERTa numbers positions after pad_token_id
            raise ConfigError(f"config.json 'max_position_embeddings' ({self.max_position_embeddings}) leaves no "
                              f"positions after the padding offset {self.position_offset} ('pad_token_id' + 1).")
