"""Decoder export: ONE graph for prefill and decode, with the KV cache as inputs and outputs.

Inputs: ``input_ids`` (batch, sequence), ``attention_mask`` (batch, total_sequence = past_sequence + sequence),
``position_ids`` (batch, sequence), ``past_key_values.{i}.key/value`` (batch, kv_heads, past_sequence, head_dim),
whose past_sequence may be 0. Outputs: ``logits`` (batch, sequence, vocab) and ``present.{i}.key/value``
(batch, kv_heads, total_sequence, head_dim). The names match Optimum's, so tools interoperate.
"""

from __future__ import annotations

import numpy as np

from kiln.exporter.specs import AxisRange, ExportSpec, TensorSpec


def decoder_feed(config, names: list[str]):
    """Random prompts, every other row left-padded (as batched generation pads), with a random past of the sizes."""
    layers, Hkv, D = config.num_hidden_layers, config.kv_heads, config.dim

    def make(sizes: dict, rng: np.random.Generator) -> dict:
        B, T, P = sizes["batch"], sizes["sequence"], sizes["past_sequence"]
        S = P + T
        lengths = np.full(B, S)
        if B > 1:
            lengths[1::2] = rng.integers(max(1, T // 2 + 1), S + 1, size=len(lengths[1::2]))
        mask = (np.arange(S)[None, :] >= (S - lengths)[:, None]).astype(np.int64)  # left padding
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, P:]
        feed = {"input_ids": rng.integers(0, config.vocab_size, size=(B, T)).astype(np.int64),
                "attention_mask": mask, "position_ids": positions.astype(np.int64)}
        for i in range(layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = rng.standard_normal((B, Hkv, P, D)).astype(np.float32)
        return {name: feed[name] for name in names}

    return make


def decoder_spec(model, task: str, batch: AxisRange | None = None, seq: AxisRange | None = None,
                 hidden_states: bool = False, attentions: bool = False) -> ExportSpec:
    if hidden_states or attentions:
        raise ValueError("--output-hidden-states/--output-attentions are not supported for text-generation exports.")
    config = model.config
    B, T, P, S = "batch", "sequence", "past_sequence", "total_sequence"
    inputs = [TensorSpec("input_ids", "int64", (B, T)), TensorSpec("attention_mask", "int64", (B, S)),
              TensorSpec("position_ids", "int64", (B, T))]
    outputs = [TensorSpec("logits", "float32", (B, T, config.vocab_size))]
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(TensorSpec(f"past_key_values.{i}.{kind}", "float32", (B, config.kv_heads, P, config.dim)))
            outputs.append(TensorSpec(f"present.{i}.{kind}", "float32", (B, config.kv_heads, S, config.dim)))
    context = config.max_position_embeddings
    seq = seq or AxisRange(1, context)
    if seq.max > context:
        raise ValueError(f"--seq max {seq.max} exceeds the model's context window {context} (max_position_embeddings).")
    axes = {B: batch or AxisRange(1, 64), T: seq, P: AxisRange(0, context - 1)}
    return ExportSpec(task, tuple(inputs), tuple(outputs), axes, decoder_feed(config, [t.name for t in inputs]),
                      atol=1e-4, extra={"derived_axes": {S: (P, T)}})
