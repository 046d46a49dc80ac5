"""DeBERTa-v2 / DeBERTa-v3 configuration (model_type "deberta-v2"), read from a Hugging Face config.json as
transformers reads it: ``pos_att_type`` as a list or a "p2c|c2p" string, ``max_relative_positions`` < 1 meaning
``max_position_embeddings``, and the keys only some checkpoints carry (``position_buckets``, ``share_att_key``,
``norm_rel_ebd``, ``embedding_size``, ``conv_kernel_size``) with transformers' defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import ConfigError
from kiln.graphs.config_fields import (check_bool, check_choice, check_eps, check_heads, check_problem_type,
                                       check_sizes, read_id2label)
from kiln.graphs.registry import Variant

VARIANTS = {"deberta-v2": Variant("DebertaV2")}  # DeBERTa-v3 checkpoints are "deberta-v2" too
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "tanh")
POSITION_TERMS = ("c2p", "p2c", "p2p")  # p2p is accepted and unused, as in transformers' DeBERTa-v2


@dataclass(frozen=True)
class DebertaV2Config:
    model_type: str = "deberta-v2"
    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    pad_token_id: int = 0
    embedding_size: int | None = None  # None: hidden_size; else projected to it after the embeddings
    attention_head_size: int | None = None  # None: hidden_size / num_attention_heads
    position_biased_input: bool = True  # absolute position embeddings added to the input (v3: false)
    relative_attention: bool = False  # the disentangled terms below; v2 and v3 checkpoints set it
    pos_att_type: tuple[str, ...] = ()  # which relative terms: content-to-position, position-to-content
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    position_buckets: int = -1  # > 0: relative distances in log buckets, this many each side (v3: 256)
    share_att_key: bool = False  # the relative terms reuse the content query/key projections (v3: true)
    norm_rel_ebd: str = "none"  # "layer_norm": the relative embeddings are LayerNormed first
    conv_kernel_size: int = 0  # > 0: a convolution beside the first layer (v2 xlarge/xxlarge)
    conv_groups: int = 1
    conv_act: str = "tanh"
    pooler_hidden_size: int | None = None  # None: hidden_size
    pooler_hidden_act: str = "gelu"
    legacy: bool = True  # the masked-LM head's weight names (cls.predictions.* or lm_predictions.lm_head.*)
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    def heads_in_layer(self, layer: int) -> int:
        return self.num_attention_heads  # transformers cannot prune DeBERTa's heads; neither does kiln

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def relative_span(self) -> int:
        """How many relative positions each side the embeddings hold (``att_span`` in transformers)."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def relative_positions(self) -> int:
        """The distance at which log buckets reach the last one (``max_position`` in transformers)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def score_scale(self) -> int:
        """The scores are divided by sqrt(head_dim * this): one for the content term and one per relative term."""
        return 1 + sum(term in self.pos_att_type for term in ("c2p", "p2c"))

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, raw: dict) -> "DebertaV2Config":
        known = {name for name in cls.__dataclass_fields__ if name != "raw"}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        terms = values.get("pos_att_type", ())
        if isinstance(terms, str):  # "p2c|c2p", as transformers splits it
            terms = [t.strip() for t in terms.lower().split("|") if t.strip()]
        if not isinstance(terms, (list, tuple)) or not all(isinstance(t, str) for t in terms):
            raise ConfigError(f"config.json 'pos_att_type' must be a list such as [\"p2c\", \"c2p\"] or a string "
                              f"such as \"p2c|c2p\", got {terms!r:.100}.")
        values["pos_att_type"] = tuple(terms)
        labels = read_id2label(raw)
        if labels is not None:
            values["id2label"] = labels
        config = cls(**values, raw=dict(raw))
        config.validate()
        return config

    def validate(self) -> None:
        check_sizes(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "max_position_embeddings", "conv_groups"))
        check_sizes(self, ("type_vocab_size", "conv_kernel_size"), least=0)
        for name in ("embedding_size", "attention_head_size", "pooler_hidden_size"):
            if getattr(self, name) is not None:
                check_sizes(self, (name,))
        if self.attention_head_size is None:
            check_heads(self.hidden_size, self.num_attention_heads)
        for name in ("max_relative_positions", "position_buckets"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value > 1 << 24:
                raise ConfigError(f"config.json '{name}' must be an integer (-1: not set), got {value!r}.")
        check_bool(self, "position_biased_input", "relative_attention", "share_att_key", "legacy")
        for name in ("hidden_act", "pooler_hidden_act", "conv_act"):
            check_choice(self, name, ACTIVATIONS)
        unknown = [t for t in self.pos_att_type if t not in POSITION_TERMS]
        if unknown:
            raise ConfigError(f"config.json 'pos_att_type' has {unknown[0]!r}; DeBERTa's relative terms are "
                              f"{', '.join(POSITION_TERMS)}.")
        norms = [n.strip() for n in str(self.norm_rel_ebd).lower().split("|")]
        if not set(norms) <= {"none", "layer_norm"}:
            raise ConfigError(f"config.json 'norm_rel_ebd' {self.norm_rel_ebd!r} is not supported; use \"layer_norm\" "
                              "or \"none\".")
        if self.pooler_hidden_size not in (None, self.hidden_size):
            raise ConfigError(f"config.json 'pooler_hidden_size' ({self.pooler_hidden_size}) must equal 'hidden_size' "
                              f"({self.hidden_size}): the classifier reads the pooler's output at hidden_size, as in "
                              "transformers.")
        if self.conv_kernel_size and (self.hidden_size % self.conv_groups or self.conv_kernel_size % 2 == 0):
            raise ConfigError(f"config.json 'conv_kernel_size' ({self.conv_kernel_size}) must be odd and "
                              f"'conv_groups' ({self.conv_groups}) must divide 'hidden_size' ({self.hidden_size}).")
        check_problem_type(self.problem_type)
        check_eps("layer_norm_eps", self.layer_norm_eps)
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"config.json 'pad_token_id' must be a token id below vocab_size, got {self.pad_token_id!r}.")

    @property
    def layer_norm_rel(self) -> bool:
        return "layer_norm" in str(self.norm_rel_ebd).lower()
