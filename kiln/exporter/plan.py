"""What an export or a TensorRT build does to the traced graph, decided before anything is traced: pure data.

``ExportPlan`` takes the facts known up front (the family's kind, the precision, the attention form asked for, the
target runtime, the inputs that get defaults) and gives the ordered graph passes (``kiln.exporter.passes.PASSES`` names with
their options) and, from the passes' results, what kiln.json records about attention. Nothing here imports torch or
onnx, so every combination is tested in milliseconds (tests/exporter/test_plan.py).

The defaults are measurements, not taste (benchmarks/RESULTS.md, "Attention forms" and "Decoder attention"):
encoders on onnxruntime's CPU provider feed (B, T, C) straight into the standard Attention op (``onnx-3d``, 1-14%
faster than the traced form on MiniLM and BERT-base); decoders get RotaryEmbedding nodes (decode 4.9% faster), 3-D
attention (2-5%), packed projections (4-6%), a KV cache written in place (SmolLM2 decode at 3,000 tokens of
context in 0.50-0.79x the time, half the peak memory) and ``logits_to_keep`` (prefill 11-17%); half-precision artifacts are for
GPUs and keep the traced form, which TensorRT parses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import ExportError, InputError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
FORMS = ("onnx", "onnx-3d", "onnx-packed", "contrib", "contrib-mha", "decomposed")
TARGETS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
TRACED = "onnx-attention"  # the converter wrote one fused Attention node per layer; else "decomposed"
# The encoder form of ``--attention auto`` per target and precision.
DEFAULT_FORMS = {
    "onnxruntime-cpu": {"fp32": "onnx-3d", "int8": "onnx-3d", "int4": "onnx"},
    "onnxruntime-cuda": {"fp16": "onnx", "bf16": "onnx", "fp32": "onnx"},
    "tensorrt": {"fp32": "onnx", "fp16": "onnx", "bf16": "onnx"},
}
# The pass lists. A pass that finds nothing of its pattern changes nothing (and says why in its result).
ONNXRUNTIME_ENCODER = ("encoder-attention",)
ONNXRUNTIME_DECODER = ("rotary", "decoder-attention-3d", "pack-projections", "cache-in-place")
DECODER_ALWAYS = ("logits-to-keep",)  # every decoder graph takes logits_to_keep, whatever its target
TENSORRT = ("cache-concat", "to-4d", "unfuse-rotary", "lower-attention", "half")


@dataclass(frozen=True)
class Step:
    """One pass of a plan: its name in ``kiln.exporter.passes.PASSES`` and its options."""

    name: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ExportPlan:
    kind: str  # encoder | decoder (a family's spec "decoder", or any encoder spec)
    precision: str = "fp32"
    attention: str = "auto"  # as asked: auto or one of FORMS
    target: str = ""  # "" = from the precision: fp16/bf16 artifacts are for GPUs, the others for CPUs
    defaults: tuple[str, ...] = ()  # traced inputs that get a default of ones (head_mask): optional inputs

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r} is not supported for ONNX export; choose one of "
                             f"{', '.join(PRECISIONS)}, or auto (the fastest that passes its gate, measured here).")
        if self.attention not in ("auto", *FORMS):
            raise InputError(f"--attention {self.attention!r}: choose auto or one of {', '.join(FORMS)}.")
        if not self.target:
            gpu = self.precision in ("fp16", "bf16")
            object.__setattr__(self, "target", "onnxruntime-cuda" if gpu else "onnxruntime-cpu")
        if self.target not in TARGETS:
            raise InputError(f"target {self.target!r}: choose one of {', '.join(TARGETS)}.")
        if self.kind not in ("encoder", "decoder"):
            raise ValueError(f"kind {self.kind!r}: encoder or decoder")

    @property
    def form(self) -> str:
        """The attention form aimed for. Encoders: the one asked for, or the measured default. Decoders have two:
        the traced ``onnx`` (asked for, or for GPU targets) and ``onnx-3d`` (rotary, 3-D attention, packing)."""
        if self.kind == "decoder":
            return "onnx" if self.attention == "onnx" or self.target != "onnxruntime-cpu" else "onnx-3d"
        if self.attention != "auto":
            return self.attention
        return DEFAULT_FORMS[self.target].get(self.precision, "onnx")

    def passes(self, traced: str = TRACED) -> tuple[Step, ...]:
        """The passes for a graph whose attention the converter wrote as ``traced``: ``onnx-attention`` (one fused
        node per layer) or ``decomposed`` (MatMul/Softmax: tf2onnx, and JAX with --output-attentions)."""
        defaults = tuple(Step("optional-input", {"name": name}) for name in self.defaults)
        if self.kind == "decoder":
            steps = ONNXRUNTIME_DECODER if self.form == "onnx-3d" else ()
            return (*(Step(name) for name in (*steps, *DECODER_ALWAYS)), *defaults)
        if traced != TRACED or self.form == "onnx":
            return defaults
        return (*(Step(name, {"form": self.form}) for name in ONNXRUNTIME_ENCODER), *defaults)

    def attention_record(self, traced: str, results: dict) -> dict:
        """kiln.json's ``attention`` facts from the passes' results (name -> PassResult): the form the graph ended up
        in (a form whose pattern no layer had leaves the traced one), the RotaryEmbedding nodes written and, for a
        decoder, its KV cache: ``in-place`` (a buffer the runtime binds as past and present) or ``concat``."""
        def rewritten(name: str) -> int:
            return getattr(results.get(name), "rewritten", 0)

        if traced != TRACED:
            form = traced
        elif self.kind == "decoder":
            form = "onnx-3d" if rewritten("decoder-attention-3d") else "onnx"
        else:
            form = self.form if self.form == "onnx" or rewritten("encoder-attention") else "onnx"
        record = {"form": form, "rotary_nodes": rewritten("rotary")}
        if self.kind == "decoder":
            record["cache"] = "in-place" if rewritten("cache-in-place") else "concat"
        return record

    def optional_inputs(self, results: dict) -> list[dict]:
        """The inputs with defaults the passes added, as kiln.json's ``optional_inputs`` lists them."""
        return [r.details["optional_input"] for r in results.values()
                if r.modified and "optional_input" in getattr(r, "details", {})]


def tensorrt_passes(form: str, half: str | None = None, cache: str = "concat") -> tuple[Step, ...]:
    """What ``kiln build`` does to an artifact's graph before TensorRT parses it: a KV cache written in place back to
    the standard Attention node (``cache``: kiln.json's ``attention.cache``), 3-D attention back to 4-D (the
    parser is only known to take (B, H, T, D)), RotaryEmbedding back to Mul/Add (not every parser knows the op),
    decoder attention to the kiln plugin (TensorRT's Attention has no KV cache), then, given ``half`` (fp16 or bf16:
    ``tensorrt.precision_plan`` decides when), those types written into the graph (TensorRT 11 builds strongly typed
    networks only)."""
    if form in ("contrib", "contrib-mha"):
        op = "Attention" if form == "contrib" else "MultiHeadAttention"
        raise ExportError(f"This artifact's attention is onnxruntime's com.microsoft.{op} (--attention {form}), "
                          "which TensorRT cannot parse. Re-export with --attention onnx.")
    wanted = {"cache-concat": cache == "in-place", "to-4d": form in ("onnx-3d", "onnx-packed"), "unfuse-rotary": True,
              "lower-attention": True, "half": half is not None}
    return tuple(Step(name, {"precision": half} if name == "half" else {}) for name in TENSORRT if wanted[name])
