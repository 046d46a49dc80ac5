"""Graph passes, one per file beside its inverse, all of one shape (``base.GraphPass``), named here for the plans.

``kiln.exporter.plan`` lists which passes run, in order, as data; :func:`run` instantiates and runs them on an
onnx_ir model and returns their results by name.
"""

from __future__ import annotations

import importlib

# plan name -> module:class, imported when a plan uses it
PASSES = {
    "encoder-attention": "attention_forms:EncoderAttention",
    "rotary": "rotary:FuseRotary",
    "unfuse-rotary": "rotary:UnfuseRotary",
    "decoder-attention-3d": "attention_3d:DecoderAttention3D",
    "to-4d": "attention_3d:To4D",
    "pack-projections": "pack:PackProjections",
    "cache-in-place": "cache_in_place:CacheInPlace",
    "cache-concat": "cache_in_place:CacheConcat",
    "logits-to-keep": "logits:KeepLastLogits",
    "optional-input": "optional_input:OptionalInput",
    "lower-attention": "lower_attention:LowerForTensorRT",
    "decompose-plugin": "lower_attention:DecomposePlugin",
    "half": "half:HalfPrecision",
}


def get(name: str):
    module, cls = PASSES[name].split(":")
    return getattr(importlib.import_module(f"kiln.exporter.passes.{module}"), cls)


def run(model, steps, **context) -> dict:
    """Run the plan's ``steps`` (``kiln.exporter.plan.Step``) on ``model`` in place; ``context`` holds options known
    only at run time, given to the passes that take them (e.g. ``aot`` and ``sliding_window`` for the TensorRT
    lowering). Returns {step name: PassResult}."""
    import inspect

    results = {}
    for step in steps:
        cls = get(step.name)
        accepted = inspect.signature(cls.__init__).parameters
        extra = {k: v for k, v in context.items() if k in accepted}
        results[step.name] = cls(**step.options, **extra)(model)
    return results
