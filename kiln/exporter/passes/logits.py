"""``logits_to_keep``: a decoder's LM head applied to the last positions only, as transformers' ``generate`` does.

A decoder graph returns logits for every position it is fed, but generation reads only the last one. In a prefill
the LM head is the largest product of the graph (SmolLM2-135M: 576 x 49152 per position, 18% of a 32-token prefill
on onnxruntime CPU), and every position's logits are written out besides. The pass gives the graph a scalar int64
input ``logits_to_keep`` with the semantics of the transformers argument of that name (``0``: every position, ``k``:
the last ``k``) that slices the hidden states before the head. It is stored with an initializer of 0, so a caller that
does not feed it (the validator, the accuracy gate, a user scoring whole sequences) gets every position as before;
onnxruntime lets it be fed like an input (``get_overridable_initializers``), and TensorRT's parser takes it as the
constant 0.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.exporter.passes.base import GraphPass, PassResult, Skip
from kiln.exporter.passes.builder import initializer

NAME = "logits_to_keep"
# Its entry in kiln.json's ``optional_inputs``.
OPTIONAL_INPUT = {"name": NAME, "dtype": "int64", "shape": [], "default": 0}


class KeepLastLogits(GraphPass):
    """The graph output ``output`` (a decoder's logits) computed for the last ``logits_to_keep`` positions only."""

    name = "logits_to_keep"

    def __init__(self, output: str = "logits"):
        self.output = output

    def candidates(self, model):
        return [model]

    def match(self, model: ir.Model):
        graph = model.graph
        logits = next((v for v in graph.outputs if v.name == self.output), None)
        head, after = _head(logits) if logits is not None else (None, [])
        if head is None or not _maps_sequence_axis(head):
            return Skip(f"{self.output!r} is not a product of (batch, sequence, hidden) states")
        if any(v.name == NAME for v in graph.inputs):
            return Skip(f"the graph already takes {NAME}")
        hidden = head.inputs[0]
        if hidden.shape is None or len(hidden.shape) != 3:
            return Skip("the LM head's input is not (batch, sequence, hidden)")
        return logits, head, hidden, after

    def rewrite(self, model, match, result: PassResult) -> None:
        logits, head, hidden, after = match
        graph = model.graph
        keep = ir.Value(name=NAME, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]),
                        const_value=ir.tensor(np.array(0, dtype=np.int64), name=NAME))
        graph.inputs.append(keep)
        graph.register_initializer(keep)
        # Slice(hidden, starts=[-k], ends=[INT64_MAX], axes=[1]): k = 0 starts at 0 (every position), k = 1 at -1.
        neg = ir.node("Neg", [keep], name=f"{NAME}_neg")
        starts = ir.node("Unsqueeze", [neg.outputs[0], _ints(graph, f"{NAME}_axes0", [0])], name=f"{NAME}_starts")
        sliced = ir.node("Slice", [hidden, starts.outputs[0], _ints(graph, f"{NAME}_ends", [np.iinfo(np.int64).max]),
                                   _ints(graph, f"{NAME}_axes", [1])], name=f"{NAME}_slice")
        for node in (neg, starts, sliced):
            graph.insert_before(head, node)
        # Every value typed: the fp16/bf16 pass reads the types (tf2onnx's graphs carry them all).
        neg.outputs[0].dtype, neg.outputs[0].shape = ir.DataType.INT64, ir.Shape([])
        starts.outputs[0].dtype, starts.outputs[0].shape = ir.DataType.INT64, ir.Shape([1])
        sliced.outputs[0].name = f"{hidden.name}_kept"
        sliced.outputs[0].dtype = hidden.dtype
        sliced.outputs[0].shape = ir.Shape([hidden.shape[0], ir.SymbolicDim("logits_sequence"), hidden.shape[2]])
        head.replace_input_with(0, sliced.outputs[0])
        for value in (*after, logits):  # the head's output, what soft-caps it, the logits: (B, kept, V) now
            if value.shape is not None and len(value.shape) == 3:
                value.shape = ir.Shape([value.shape[0], ir.SymbolicDim("logits_sequence"), value.shape[2]])
        result.details["optional_input"] = dict(OPTIONAL_INPUT)

    def finish(self, model, result) -> None:
        pass


# Element-wise steps between the head and the logits, each with a scalar constant beside the logits if binary: Gemma
# 2's final soft-capping, tanh(x / cap) * cap. Slicing positions before the head commutes with them.
_ELEMENTWISE = ("Div", "Mul", "Tanh")


def _head(logits: ir.Value) -> tuple[ir.Node | None, list[ir.Value]]:
    """The node that makes the logits from the hidden states, through element-wise steps (whose outputs are listed)."""
    node, after = logits.producer(), []
    while node is not None and node.op_type in _ELEMENTWISE and node.domain in ("", "ai.onnx"):
        varying = [v for v in node.inputs if not _scalar_constant(v)]
        if len(varying) != 1:
            break
        after.append(varying[0])
        node = varying[0].producer()
    return node, after


def _scalar_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.size == 1


def _maps_sequence_axis(head: ir.Node) -> bool:
    """Whether axis 1 of the head's first input is axis 1 of its output: a MatMul (torch.onnx, tf2onnx) or an Einsum
    such as ``abc,cd->abd`` (jax2onnx)."""
    if head.domain not in ("", "ai.onnx"):
        return False
    if head.op_type == "MatMul":
        return True
    if head.op_type != "Einsum" or len(head.inputs) != 2:
        return False
    equation = head.attributes.get_string("equation", "").replace(" ", "")
    terms, _, out = equation.partition("->")
    first, _, second = terms.partition(",")
    return (len(first) == len(out) == 3 and "." not in equation and first[:2] == out[:2]
            and first[1] not in second)


def _ints(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    return initializer(graph, name, np.array(values, dtype=np.int64))
