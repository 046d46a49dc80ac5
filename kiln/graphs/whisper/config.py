"""Whisper configuration, read from a Hugging Face config.json (model_type "whisper").

Fields keep Whisper's own names (``d_model``, ``encoder_layers``, ``decoder_attention_heads``, ...), so
``save_pretrained`` writes a config.json transformers reads back; the properties give the generic names the exporter
and the decode loop read (``hidden_size``, ``num_hidden_layers`` = decoder layers, ``head_dim``, ...). Every size of
openai/whisper (tiny to large-v3, 80 or 128 mel bins) and distil-whisper (fewer decoder than encoder layers) is this
one config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import ConfigError
from kiln.graphs.registry import Variant

# activation_function -> the GELU/ReLU the reference applies (every released Whisper uses "gelu").
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")

VARIANTS = {"whisper": Variant("Whisper")}  # the model types this family reads

_SIZES = ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "decoder_layers",
          "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_source_positions",
          "max_target_positions")


@dataclass(frozen=True)
class WhisperConfig:
    model_type: str = "whisper"
    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    activation_function: str = "gelu"
    max_source_positions: int = 1500  # encoder positions: 2 mel frames each (30 s = 3000 frames)
    max_target_positions: int = 448  # decoder positions: the longest token sequence, prompt included
    # transformers builds an embed_scale from this but never applies it (WhisperEncoder/WhisperDecoder.forward);
    # kiln reads it, and does the same.
    scale_embedding: bool = False
    tie_word_embeddings: bool = True  # proj_out is the decoder's token embedding
    decoder_start_token_id: int = 50257
    bos_token_id: int | None = 50256
    eos_token_id: int | list | None = 50256  # <|endoftext|>
    pad_token_id: int | None = 50256
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read, written back unchanged

    # The generic names the exporter and the shared code read (the decoder's: the one with a cache).
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.decoder_layers

    @property
    def num_attention_heads(self) -> int:
        return self.decoder_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.decoder_attention_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    @property
    def encoder_head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def max_position_embeddings(self) -> int:
        return self.max_target_positions

    @property
    def input_frames(self) -> int:
        """Mel frames the encoder takes: two per position (the second convolution has stride 2), 3000 for 30 s."""
        return 2 * self.max_source_positions

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @classmethod
    def from_dict(cls, raw: dict) -> "WhisperConfig":
        known = {name for name in cls.__dataclass_fields__ if name != "raw"}
        # null means "the default", except for token ids, where null means "none" (as transformers reads them).
        values = {k: v for k, v in raw.items() if k in known and (v is not None or k.endswith("_token_id"))}
        config = cls(**values, raw=dict(raw))
        config.validate()
        return config

    def validate(self) -> None:
        for name in _SIZES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json '{name}' must be a positive integer, got {value!r}.")
            if value > 1 << 24:
                raise ConfigError(f"config.json '{name}' = {value} is implausibly large; the file looks corrupt.")
        for heads in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, heads):
                raise ConfigError(f"config.json 'd_model' ({self.d_model}) must be divisible by '{heads}' "
                                  f"({getattr(self, heads)}).")
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"config.json 'activation_function' {self.activation_function!r} is not supported; "
                              f"kiln implements {', '.join(ACTIVATIONS)}.")
        if not isinstance(self.decoder_start_token_id, int) or not 0 <= self.decoder_start_token_id < self.vocab_size:
            raise ConfigError(f"config.json 'decoder_start_token_id' must be a token id below vocab_size "
                              f"({self.vocab_size}), got {self.decoder_start_token_id!r}.")
        if self.raw.get("use_weighted_layer_sum"):
            raise ConfigError("config.json sets 'use_weighted_layer_sum', which only transformers' "
                              "WhisperForAudioClassification reads; kiln exports Whisper for speech recognition.")
