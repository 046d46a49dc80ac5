"""The one node builder and the small pattern tests the graph passes share.

A rewrite makes a few nodes at once and puts them in one place: :class:`Builder` collects them, named after the node
they serve, and inserts them before or after it. Weights and other stored tensors go in as graph initializers
(:func:`initializer`); small shape and axis constants as ``Constant`` nodes, the form torch.onnx writes them in.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

HEADS = (0, 2, 1, 3)  # (B, T, H, D) <-> (B, H, T, D): the permutation attention's Reshape/Transpose pairs use
_serial = itertools.count()  # unique names where a rewrite has no node of its own to name after


class Builder:
    """New nodes for one rewrite: ``b.op("Mul", [x, y])`` returns the output value (a tuple for ``outputs > 1``),
    ``b.const([0, 0, -1])`` a Constant node's value; ``b.insert_before(graph, node)`` puts them all in place."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"kiln_{next(_serial)}"
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], *, outputs: int = 1, domain: str = "",
           name: str | None = None, **attributes) -> ir.Value | tuple[ir.Value, ...]:
        node = ir.node(op_type, list(inputs), attributes=attributes, num_outputs=outputs, domain=domain,
                       name=name or f"{self.prefix}_{op_type.lower()}_{len(self.nodes)}")
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def const(self, values, dtype=np.int64, name: str | None = None) -> ir.Value:
        array = np.asarray(values, dtype=dtype)
        return self.op("Constant", [], name=name or f"{self.prefix}_const_{len(self.nodes)}", value=ir.tensor(array))

    def insert_before(self, graph: ir.Graph, node: ir.Node) -> None:
        graph.insert_before(node, self.nodes)
        self.nodes = []

    def insert_after(self, graph: ir.Graph, node: ir.Node) -> None:
        graph.insert_after(node, self.nodes)
        self.nodes = []


def initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype=None) -> ir.Value:
    """A stored tensor registered on ``graph`` under ``name``."""
    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def like(value: ir.Value, model: ir.Value) -> ir.Value:
    """Give ``value`` the shape and type of ``model`` (passes read types: the half-precision pass among them)."""
    value.shape, value.dtype = model.shape, model.dtype
    return value


def is_transpose(node: ir.Node | None, perm: Sequence[int] = HEADS) -> bool:
    return node is not None and node.op_type == "Transpose" and list(node.attributes.get_ints("perm", [])) == list(perm)


def is_op(node: ir.Node | None, op_type: str) -> bool:
    """A standard-domain ``op_type`` node."""
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def only_reader(value: ir.Value, op_type: str) -> ir.Node | None:
    """The one node that reads ``value``, if it is an ``op_type`` node and ``value`` is not a graph output."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output() or uses[0].node.op_type != op_type:
        return None
    return uses[0].node


def from_heads(value: ir.Value) -> ir.Value | None:
    """x for ``value = Transpose(Reshape(x), perm=(0, 2, 1, 3))``, each read once, else None: q, k or v split into
    heads as torch.onnx writes it."""
    transpose = value.producer()
    if not is_transpose(transpose):
        return None
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape" or len(value.uses()) != 1 or len(transpose.inputs[0].uses()) != 1:
        return None
    return reshape.inputs[0]


def to_heads_shape(shape: ir.Shape | None, heads: int) -> ir.Shape | None:
    """(B, T, H * D) -> (B, H, T, D), or None when the width is not known."""
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
        return None
    return ir.Shape([shape[0], heads, shape[1], shape[2] // heads])
