"""A traced graph input turned into an input with a default: an initializer onnxruntime lets callers feed.

``kiln export --head-mask`` traces the reference with a ``head_mask`` (layers, heads) input, so that the graph
scales each head's attention output by it; this pass gives that input a default of all ones (every head kept), so a
plain run needs no head mask and a service can still switch heads off per call without re-exporting. onnxruntime
takes a graph input that is also an initializer as overridable (``get_overridable_initializers``); kiln.json lists
it under ``optional_inputs``, as it does ``logits_to_keep``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.exporter.passes.base import GraphPass, PassResult, Skip


class OptionalInput(GraphPass):
    """The graph input ``name`` (of static shape) gets the default ``value`` everywhere."""

    def __init__(self, name: str, value: float = 1.0):
        self.input, self.value, self.name = name, value, f"optional input {name}"

    def candidates(self, model):
        return [v for v in model.graph.inputs if v.name == self.input] or [None]

    def match(self, value):
        if value is None:
            return Skip(f"the graph has no input {self.input!r}")
        if value.const_value is not None:
            return Skip("it already has a default")
        if value.shape is None or not all(isinstance(d, int) for d in value.shape) or value.dtype is None:
            return Skip("its shape or type is not static")
        return value

    def rewrite(self, model, value: ir.Value, result: PassResult) -> None:
        array = np.full(tuple(value.shape), self.value, dtype=value.dtype.numpy())
        value.const_value = ir.tensor(array, name=value.name)
        model.graph.register_initializer(value)  # stays in graph.inputs: an overridable initializer
        result.details["optional_input"] = {"name": value.name, "dtype": str(array.dtype), "shape": list(array.shape),
                                            "default": self.value}

    def finish(self, model, result) -> None:
        pass
