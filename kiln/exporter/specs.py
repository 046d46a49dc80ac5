"""What each architecture x task exports: inputs, outputs with named dynamic axes, example feeds and tolerances."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kiln.runtime.generate import position_ids


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

    def clamp(self, value: int) -> int:
        return min(max(value, self.min), self.max)


# Shapes the exporter validates on: one row, odd lengths, padded batches, a single token, and for decoders a
# prefill after a cached prefix and a decode step over a longer cache. Axes a graph lacks are dropped.
VALIDATION_SIZES = ({"batch": 1, "sequence": 7, "past_sequence": 0}, {"batch": 2, "sequence": 16, "past_sequence": 5},
                    {"batch": 3, "sequence": 33, "past_sequence": 0}, {"batch": 1, "sequence": 1, "past_sequence": 0},
                    {"batch": 3, "sequence": 1, "past_sequence": 20})


@dataclass(frozen=True)
class ExportSpec:
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict  # axis name -> AxisRange
    make_feed: Callable  # (sizes: dict axis -> int, rng) -> {input name: array}
    atol: float = 1e-4  # per-output difference allowed: atol + rtol * max |reference|, fp32
    rtol: float = 1e-4
    extra: dict = field(default_factory=dict)  # task facts the validator needs (e.g. mask_token_id)

    def example_sizes(self) -> dict[str, int]:
        """A shape to trace at: inside the ranges and not 0/1 where possible (torch.export specialises on those)."""
        preferred = {"batch": 2, "sequence": 8}
        return {name: r.clamp(preferred.get(name, 2)) for name, r in self.axes.items()}

    def validation_sizes(self) -> list[dict[str, int]]:
        sizes = [{k: self.axes[k].clamp(v) for k, v in s.items() if k in self.axes} for s in VALIDATION_SIZES]
        return [dict(t) for t in dict.fromkeys(tuple(sorted(s.items())) for s in sizes)]


# Per-layer key/value pairs travel as ``<group>.{i}.key`` / ``.value``: the decoder's cache (``past_key_values`` in,
# ``present`` out) and an encoder-decoder's cross-attention keys/values (``cross_key_values``, out of the encoder
# graph and into the decoder's). The model side holds each group as a tuple of (key, value) per layer.
PAIRED = {"past_key_values": "past_key_values", "cross_key_values": "cross_key_values", "present": "present_key_values"}


def model_inputs(names: list[str], values) -> dict:
    """Flat graph inputs -> model keyword arguments; ``past_key_values.{i}.key/value`` (and ``cross_key_values``)
    become a list of pairs."""
    kwargs, pairs = {}, {}
    for name, value in zip(names, values):
        group, _, rest = name.partition(".")
        if group in PAIRED and rest:
            i, kind = rest.split(".")
            pairs.setdefault(group, {}).setdefault(int(i), {})[kind] = value
        else:
            kwargs[name] = value
    for group, layers in pairs.items():
        kwargs[PAIRED[group]] = [(layers[i]["key"], layers[i]["value"]) for i in sorted(layers)]
    return kwargs


def pick(outputs: dict, name: str):
    """``outputs["hidden_states"][3]`` for ``hidden_states.3``, ``outputs["present_key_values"][0][1]`` for
    ``present.0.value`` (and ``cross_key_values.0.key`` alike); plain names index the dict."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] in PAIRED:
        return outputs[PAIRED[parts[0]]][int(parts[1])][0 if parts[2] == "key" else 1]
    key, _, index = name.partition(".")
    return outputs[key][int(index)] if index else outputs[name]


def name_axes(model, spec: ExportSpec) -> None:
    """Give a traced graph's inputs and outputs (an onnx_ir model) the spec's axis names; converters name them after
    their own symbols."""
    import onnx_ir as ir

    from kiln.errors import ExportError

    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.inputs, *model.graph.outputs):
        tensor = by_name.get(value.name)
        if tensor is None:
            raise ExportError(f"The traced graph has an unexpected input or output {value.name!r}.")
        value.shape = ir.Shape([ir.SymbolicDim(a) if isinstance(a, str) else a for a in tensor.axes])


def output_flags(output_names) -> dict:
    """``output_hidden_states`` / ``output_attentions`` keyword arguments a reference needs for these outputs."""
    return {f"output_{kind}": True for kind in ("hidden_states", "attentions")
            if any(n.startswith(kind + ".") for n in output_names)}


def text_feed(vocab_size: int, pad_token_id: int, names: list[str]):
    """Random token ids with every other row right-padded, as a tokenizer would produce them."""

    def make(sizes: dict, rng: np.random.Generator) -> dict:
        batch, seq = sizes["batch"], sizes["sequence"]
        lengths = np.full(batch, seq)
        if batch > 1:
            lengths[1::2] = rng.integers(1, seq + 1, size=len(lengths[1::2]))
        ids = rng.integers(0, vocab_size, size=(batch, seq))
        ids[ids == pad_token_id] = (pad_token_id + 1) % vocab_size
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        feed = {"input_ids": np.where(mask == 1, ids, pad_token_id).astype(np.int64), "attention_mask": mask,
                "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}
        return {name: feed[name] for name in names}

    return make


def bert_spec(model, task: str, batch: AxisRange | None = None, seq: AxisRange | None = None,
              hidden_states: bool = False, attentions: bool = False) -> ExportSpec:
    config = model.config
    B, T = "batch", "sequence"
    inputs = [TensorSpec("input_ids", "int64", (B, T)), TensorSpec("attention_mask", "int64", (B, T))]
    if config.type_vocab_size > 1:  # RoBERTa has one token type, and its tokenizer returns no token_type_ids
        inputs.append(TensorSpec("token_type_ids", "int64", (B, T)))
    C = config.hidden_size
    outputs = {
        "feature-extraction": [TensorSpec("last_hidden_state", "float32", (B, T, C))]
        + ([TensorSpec("pooler_output", "float32", (B, C))] if getattr(model, "pooler", None) is not None else []),
        "text-classification": [TensorSpec("logits", "float32", (B, config.num_labels))],
        "token-classification": [TensorSpec("logits", "float32", (B, T, config.num_labels))],
        "question-answering": [TensorSpec("start_logits", "float32", (B, T)), TensorSpec("end_logits", "float32", (B, T))],
        "fill-mask": [TensorSpec("logits", "float32", (B, T, config.vocab_size))],
    }[task]
    heads = [config.heads_in_layer(i) for i in range(config.num_hidden_layers)]
    outputs += optional_outputs(config.num_hidden_layers, heads, C, hidden_states, attentions)
    axes = {B: batch or AxisRange(1, 64), T: seq or AxisRange(1, config.max_sequence_length)}
    if axes[T].max > config.max_sequence_length:
        raise ValueError(f"--seq max {axes[T].max} exceeds the model's maximum sequence length "
                         f"{config.max_sequence_length} (max_position_embeddings).")
    return ExportSpec(task, tuple(inputs), tuple(outputs), axes,
                      text_feed(config.vocab_size, config.pad_token_id, [t.name for t in inputs]))


def optional_outputs(layers: int, heads, hidden: int, hidden_states: bool, attentions: bool,
                     T: str | int = "sequence") -> list[TensorSpec]:
    """transformers' hidden_states (embeddings + each layer) and attentions (each layer's probabilities); ``heads``
    per layer (a list, for pruned models) or one count for all."""
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * layers
    out = [TensorSpec(f"hidden_states.{i}", "float32", ("batch", T, hidden)) for i in range(layers + 1)] if hidden_states else []
    out += [TensorSpec(f"attentions.{i}", "float32", ("batch", heads[i], T, T)) for i in range(layers)] if attentions else []
    return out


def image_feed(channels: int, height: int, width: int):
    """Random normal pixel values, the scale of a normalized image."""

    def make(sizes: dict, rng: np.random.Generator) -> dict:
        return {"pixel_values": rng.standard_normal((sizes["batch"], channels, height, width), dtype=np.float32)}

    return make


def vit_spec(model, task: str, batch: AxisRange | None = None, seq: AxisRange | None = None,
             hidden_states: bool = False, attentions: bool = False) -> ExportSpec:
    config = model.config
    size = getattr(config, "input_size", config.image_size)  # DINOv2 runs at its image processor's size, not image_size
    if seq is not None:
        raise ValueError(f"--seq does not apply to ViT: its sequence is fixed at {config.sequence_length} tokens by "
                         f"image size {list(size)} and patch_size {list(config.patch_size)}. "
                         "Leave --seq out.")
    B, (Hi, Wi), T, C = "batch", size, config.sequence_length, config.hidden_size
    inputs = [TensorSpec("pixel_values", "float32", (B, config.num_channels, Hi, Wi))]  # only the batch is dynamic
    has_pooler = getattr(model, "pooler", None) is not None
    pooled = [TensorSpec("pooler_output", "float32", (B, config.pooler_size))] if has_pooler else []
    outputs = {
        "feature-extraction": [TensorSpec("last_hidden_state", "float32", (B, T, C)), *pooled],
        "image-classification": [TensorSpec("logits", "float32", (B, config.num_labels))],
    }[task]
    outputs += optional_outputs(config.num_hidden_layers, config.num_attention_heads, C, hidden_states, attentions, T=T)
    return ExportSpec(task, tuple(inputs), tuple(outputs), {B: batch or AxisRange(1, 64)},
                      image_feed(config.num_channels, Hi, Wi))


# Decoders export ONE graph for prefill and decode, with the KV cache as inputs and outputs. Inputs: ``input_ids``
# (batch, sequence), ``attention_mask`` (batch, total_sequence = past_sequence + sequence), ``position_ids`` (batch,
# sequence), ``past_key_values.{i}.key/value`` (batch, kv_heads, past_sequence, head_dim), whose past_sequence may be
# 0. Outputs: ``logits`` (batch, sequence, vocab) and ``present.{i}.key/value`` (batch, kv_heads, total_sequence,
# head_dim). The names match Optimum's, so tools interoperate.

def kv_heads(config, layer: int) -> int:
    """Key/value heads of one layer: fewer in a layer with pruned heads."""
    per_layer = getattr(config, "kv_heads_in_layer", None)
    return per_layer(layer) if per_layer else config.num_key_value_heads


def cache_window(config, layer: int) -> int | None:
    """How many past keys ``layer`` keeps (Gemma's local layers: the window), or None: all of them."""
    window = getattr(config, "cache_window", None)
    return window(layer) if window else None


def decoder_feed(config, names: list[str]):
    """Random prompts, every other row left-padded (as batched generation pads), with a random past of the sizes
    (a layer whose cache is bounded by a window gets the last keys that fit)."""
    layers, D = config.num_hidden_layers, config.head_dim

    def make(sizes: dict, rng: np.random.Generator) -> dict:
        B, T, P = sizes["batch"], sizes["sequence"], sizes["past_sequence"]
        S = P + T
        lengths = np.full(B, S)
        if B > 1:
            lengths[1::2] = rng.integers(max(1, T // 2 + 1), S + 1, size=len(lengths[1::2]))
        mask = (np.arange(S)[None, :] >= (S - lengths)[:, None]).astype(np.int64)  # left padding
        positions = position_ids(mask)[:, P:]
        feed = {"input_ids": rng.integers(0, config.vocab_size, size=(B, T)).astype(np.int64),
                "attention_mask": mask, "position_ids": positions.astype(np.int64)}
        for i in range(layers):
            for kind in ("key", "value"):
                window = cache_window(config, i)
                shape = (B, kv_heads(config, i), P if window is None else min(P, window), D)
                feed[f"past_key_values.{i}.{kind}"] = rng.standard_normal(shape).astype(np.float32)
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
    windows = set()
    for i in range(config.num_hidden_layers):
        window = cache_window(config, i)  # a layer whose cache the window bounds has axes of its own
        windows.add(window)
        past, present = (P, S) if window is None else ("past_window", "present_window")
        for kind in ("key", "value"):
            Hkv = kv_heads(config, i)  # per layer: a pruned layer has fewer
            inputs.append(TensorSpec(f"past_key_values.{i}.{kind}", "float32", (B, Hkv, past, config.head_dim)))
            outputs.append(TensorSpec(f"present.{i}.{kind}", "float32", (B, Hkv, present, config.head_dim)))
    context = config.max_position_embeddings
    seq = seq or AxisRange(1, context)
    if seq.max > context:
        raise ValueError(f"--seq max {seq.max} exceeds the model's context window {context} (max_position_embeddings).")
    axes = {B: batch or AxisRange(1, 64), T: seq, P: AxisRange(0, context - 1)}
    windows.discard(None)
    if windows:  # one window for all local layers (Gemma's config has one)
        axes["past_window"] = AxisRange(0, min(max(windows), context - 1))
    extra = {"derived_axes": {S: (P, T)}}
    if getattr(config, "recompute_cache_at", None):  # LongRoPE: generation reruns the sequence once (kiln.json)
        extra["recompute_cache_at"] = config.recompute_cache_at
    # fp32 differences between onnxruntime and torch grow with depth: SmolLM2-135M's 30 layers reach 1.2e-4 of the
    # logits' magnitude on a Zen 4 host (AVX-512 kernels; under 1e-4 on Zen 3) with every validation token agreeing,
    # so rtol grows past 16 layers.
    rtol = 1e-4 * max(1.0, config.num_hidden_layers / 16)
    return ExportSpec(task, tuple(inputs), tuple(outputs), axes, decoder_feed(config, [t.name for t in inputs]),
                      atol=1e-4, rtol=rtol, extra=extra)


# Encoder-decoder speech models (Whisper) export two graphs. The encoder graph runs once per 30 s window:
# ``input_features`` (batch, mel bins, frames) -> ``encoder_last_hidden_state`` and every decoder layer's
# ``cross_key_values.{i}.key/value`` (batch, heads, encoder positions, head_dim). The decoder graph is the decoders' one
# graph for prefill and decode (above), which also takes those cross-attention keys/values as inputs.

def speech_encoder_spec(model, task: str, batch: AxisRange | None = None, seq: AxisRange | None = None,
                        hidden_states: bool = False, attentions: bool = False) -> ExportSpec:
    if hidden_states or attentions:
        raise ValueError("--output-hidden-states/--output-attentions are not supported for speech exports yet.")
    config = model.config
    B, F, N, E = "batch", config.num_mel_bins, config.input_frames, config.max_source_positions
    inputs = (TensorSpec("input_features", "float32", (B, F, N)),)  # 30 s of mel frames: only the batch varies
    outputs = (TensorSpec("encoder_last_hidden_state", "float32", (B, E, config.d_model)),
               *_cross_key_values(config))

    def make(sizes: dict, rng: np.random.Generator) -> dict:
        return {"input_features": rng.standard_normal((sizes["batch"], F, N)).astype(np.float32)}

    return ExportSpec(task, inputs, outputs, {B: batch or AxisRange(1, 64)}, make, extra={"check": "speech-encoder"})


def _cross_key_values(config) -> list[TensorSpec]:
    shape = ("batch", config.decoder_attention_heads, config.max_source_positions, config.head_dim)
    return [TensorSpec(f"cross_key_values.{i}.{kind}", "float32", shape)
            for i in range(config.decoder_layers) for kind in ("key", "value")]


def speech_decoder_spec(model, task: str, batch: AxisRange | None = None, seq: AxisRange | None = None,
                        hidden_states: bool = False, attentions: bool = False) -> ExportSpec:
    import dataclasses

    spec = decoder_spec(model, task, batch, seq, hidden_states, attentions)
    cross = _cross_key_values(model.config)
    outputs = spec.outputs
    if getattr(model, "alignment_heads", ()):  # word timestamps read these heads' cross-attention
        outputs += (TensorSpec("alignment_weights", "float32", ("batch", len(model.alignment_heads), "sequence",
                                                                model.config.max_source_positions)),)

    def make(sizes: dict, rng: np.random.Generator) -> dict:
        feed = spec.make_feed(sizes, rng)
        return feed | {t.name: rng.standard_normal((sizes["batch"], *t.axes[1:])).astype(np.float32) for t in cross}

    return dataclasses.replace(spec, inputs=(*spec.inputs, *cross), outputs=outputs, make_feed=make)


# Image + text dual encoders (CLIP, SigLIP) export two graphs, so that a service embeds images without the text tower
# and the reverse: ``text`` (the main one) takes the tokens and gives ``text_embeds`` (B, projection), the projected
# features before normalization (transformers' get_text_features), and ``last_hidden_state``; ``vision`` takes
# ``pixel_values`` (only the batch dynamic) and gives ``image_embeds`` and ``last_hidden_state``. The runtime
# normalizes and scores (logit_scale and logit_bias are in kiln.json).

def _graph_inputs(module) -> list[str]:
    import inspect

    return [name for name in inspect.signature(module.forward).parameters]


def dual_text_spec(model, task: str, batch: AxisRange | None = None, seq: AxisRange | None = None,
                   hidden_states: bool = False, attentions: bool = False) -> ExportSpec:
    if hidden_states or attentions:
        raise ValueError("--output-hidden-states/--output-attentions are not supported for image + text exports yet.")
    text = model.config.text
    B, T = "batch", "sequence"
    names = _graph_inputs(model.export_graphs()["text"])  # SigLIP's text tower takes no attention mask
    inputs = tuple(TensorSpec(name, "int64", (B, T)) for name in names)
    outputs = (TensorSpec("text_embeds", "float32", (B, model.config.projection_dim)),
               TensorSpec("last_hidden_state", "float32", (B, T, text.hidden_size)))
    context = text.max_position_embeddings
    seq = seq or AxisRange(1, context)
    if seq.max > context:
        raise ValueError(f"--seq max {seq.max} exceeds the text model's maximum length {context} "
                         "(text_config.max_position_embeddings).")
    pad = text.pad_token_id if text.pad_token_id is not None else 0
    return ExportSpec(task, inputs, outputs, {B: batch or AxisRange(1, 64), T: seq}, text_feed(text.vocab_size, pad, names),
                      extra={"check": "text-embeddings"})


def dual_vision_spec(model, task: str, batch: AxisRange | None = None, seq: AxisRange | None = None,
                     hidden_states: bool = False, attentions: bool = False) -> ExportSpec:
    vision = model.config.vision
    B, (Hi, Wi) = "batch", vision.image_size
    inputs = (TensorSpec("pixel_values", "float32", (B, vision.num_channels, Hi, Wi)),)
    outputs = (TensorSpec("image_embeds", "float32", (B, model.config.projection_dim)),
               TensorSpec("last_hidden_state", "float32", (B, vision.sequence_length, vision.hidden_size)))
    return ExportSpec(task, inputs, outputs, {B: batch or AxisRange(1, 64)}, image_feed(vision.num_channels, Hi, Wi),
                      extra={"check": "image-embeddings"})


def with_head_mask(spec: ExportSpec, layers: int, heads: int) -> ExportSpec:
    """``spec`` with a ``head_mask`` (layers, heads) input, fed random 0/1 masks (each row keeping one head at least)
    so that validation sees masked heads; the export then gives it a default of ones."""

    def make(sizes: dict, rng: np.random.Generator) -> dict:
        mask = (rng.random((layers, heads)) > 0.3).astype(np.float32)
        mask[np.arange(layers), rng.integers(0, heads, layers)] = 1.0
        return {**spec.make_feed(sizes, rng), "head_mask": mask}

    inputs = (*spec.inputs, TensorSpec("head_mask", "float32", (layers, heads)))
    return ExportSpec(spec.task, inputs, spec.outputs, spec.axes, make, spec.atol, spec.rtol, spec.extra)


# A family's record names its layout (``Architecture.spec``).
SPECS = {"text-encoder": bert_spec, "vision-encoder": vit_spec, "decoder": decoder_spec,
         "speech-seq2seq": speech_decoder_spec, "dual-encoder": dual_text_spec}
# Layouts whose artifact holds more graphs than the main one: graph name -> its spec. The reference gives the module
# of each (``export_graphs()``); the main graph is the one run per step, described at the top of kiln.json.
COMPANIONS = {"speech-seq2seq": {"encoder": speech_encoder_spec}, "dual-encoder": {"vision": dual_vision_spec}}


def spec_for(kind: str, model, task: str, **options) -> ExportSpec:
    return SPECS[kind](model, task, **options)
