"""What each architecture x task exports: inputs, outputs with named dynamic axes, dummy inputs and tolerances."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    axes: tuple  # named dynamic axes (str) or fixed sizes (int)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.axes)}


@dataclass(frozen=True)
class AxisRange:
    min: int
    max: int

    @classmethod
    def parse(cls, text: str | None, default: "AxisRange", name: str) -> "AxisRange":
        if text is None:
            return default
        try:
            lo, hi = (int(part) for part in str(text).split(":"))
        except ValueError:
            raise ValueError(f"--{name} takes MIN:MAX (two integers, e.g. 1:64), got {text!r}.") from None
        if not 1 <= lo <= hi:
            raise ValueError(f"--{name} {text}: need 1 <= MIN <= MAX.")
        return cls(lo, hi)


@dataclass(frozen=True)
class ExportSpec:
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict = field(default_factory=dict)  # axis name -> AxisRange
    atol: float = 1e-4  # per-output max abs difference allowed, fp32
    vocab_size: int = 2
    pad_token_id: int = 0

    def dummy_inputs(self, batch: int, seq: int, rng: np.random.Generator, pad_rows: bool = True) -> dict:
        """Random token ids with some rows right-padded, as a tokenizer would produce them."""
        lengths = np.full(batch, seq)
        if pad_rows and batch > 1:
            lengths[1::2] = rng.integers(1, seq + 1, size=len(lengths[1::2]))
        ids = rng.integers(0, self.vocab_size, size=(batch, seq))
        ids[ids == self.pad_token_id] = (self.pad_token_id + 1) % self.vocab_size
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids = np.where(mask == 1, ids, self.pad_token_id).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if any(t.name == "token_type_ids" for t in self.inputs):
            feed["token_type_ids"] = np.zeros_like(ids)
        return feed


def bert_spec(config, task: str, has_pooler: bool, batch: AxisRange | None = None, seq: AxisRange | None = None) -> ExportSpec:
    B, T = "batch", "sequence"
    inputs = [TensorSpec("input_ids", "int64", (B, T)), TensorSpec("attention_mask", "int64", (B, T))]
    if config.type_vocab_size > 1:  # RoBERTa has one token type, and its tokenizer returns no token_type_ids
        inputs.append(TensorSpec("token_type_ids", "int64", (B, T)))
    if task == "feature-extraction":
        outputs = [TensorSpec("last_hidden_state", "float32", (B, T, config.hidden_size))]
        if has_pooler:
            outputs.append(TensorSpec("pooler_output", "float32", (B, config.hidden_size)))
    elif task == "text-classification":
        outputs = [TensorSpec("logits", "float32", (B, config.num_labels))]
    else:  # registry.check_task guards this; keep the message in case a caller skips it
        raise ValueError(f"no export spec for task {task!r}")
    axes = {B: batch or AxisRange(1, 64), T: seq or AxisRange(1, config.max_sequence_length)}
    if axes[T].max > config.max_sequence_length:
        raise ValueError(f"--seq max {axes[T].max} exceeds the model's maximum sequence length "
                         f"{config.max_sequence_length} (max_position_embeddings).")
    return ExportSpec(task, tuple(inputs), tuple(outputs), axes, vocab_size=config.vocab_size,
                      pad_token_id=config.pad_token_id)
