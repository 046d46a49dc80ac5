"""One tracer per framework, each ``trace(model, spec, path, opset) -> path`` and ``reference_runner(model, names)``:
``torch`` (torch.onnx, dynamo), ``jax`` (jax2onnx) and ``tf`` (tf2onnx)."""

from __future__ import annotations

import importlib


def tracer(framework: str):
    """The module ``kiln.exporter.trace.<framework>`` (it imports that framework)."""
    return importlib.import_module(f"kiln.exporter.trace.{framework}")
