"""Rotary position embedding as one standard ONNX ``RotaryEmbedding`` node (opset 23) per query/key tensor.

torch.onnx writes the references' ``x * cos + rotate_half(x) * sin`` as six nodes per tensor (Split, Neg, Concat,
Mul, Mul, Add): in a 30-layer decoder, 360 nodes that each decode step pays for. The standard op takes the half-width
caches (batch, sequence, head_dim / 2); they are sliced once from the full-width cos/sin the graph already computes
(``cat([freqs, freqs])``) and shared by every layer. The rewrite applies only to the exact pattern; the exporter
validates the result against the reference like any graph.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

log = logging.getLogger("kiln")


def fuse_rotary(model: ir.Model) -> int:
    """Rewrite ``model`` in place; returns the number of RotaryEmbedding nodes written."""
    graph, caches, count = model.graph, {}, 0
    for add in [n for n in graph if n.op_type == "Add" and n.domain in ("", "ai.onnx")]:
        match = _match(add)
        if match is None:
            continue
        x, cos, sin = match
        if (cos, sin) not in caches:
            caches[cos, sin] = (_half_cache(graph, cos, x.shape[3] // 2), _half_cache(graph, sin, x.shape[3] // 2))
        cos_half, sin_half = caches[cos, sin]
        node = ir.node("RotaryEmbedding", [x, cos_half, sin_half], attributes={"interleaved": 0},
                       name=f"{add.name}_rotary")
        graph.insert_before(add, node)
        node.outputs[0].shape, node.outputs[0].dtype = add.outputs[0].shape, add.outputs[0].dtype
        ir.convenience.replace_all_uses_with(add.outputs[0], node.outputs[0], replace_graph_outputs=True)
        count += 1
    if count:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
    log.info("rotary: %d RotaryEmbedding node(s) written", count)
    return count


def _match(add: ir.Node):
    """(x, cos, sin) for ``Add(Mul(x, cos), Mul(Concat(Neg(Split(x)[1]), Split(x)[0]), sin))``, else None."""
    muls = [v.producer() for v in add.inputs]
    if any(m is None or m.op_type != "Mul" for m in muls):
        return None
    for plain, rotated in (muls, muls[::-1]):
        concat = rotated.inputs[0].producer()
        if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
            continue
        neg, first = concat.inputs[0].producer(), concat.inputs[1]
        split = first.producer()
        if neg is None or neg.op_type != "Neg" or split is None or split.op_type != "Split":
            continue
        if len(split.outputs) != 2 or neg.inputs[0] is not split.outputs[1] or first is not split.outputs[0]:
            continue
        x = split.inputs[0]
        if plain.inputs[0] is not x or concat.attributes.get_int("axis") not in (-1, 3):
            continue
        if split.attributes.get_int("axis") not in (-1, 3) or (len(split.inputs) > 1 and split.inputs[1] is not None):
            continue
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
            return None
        return x, plain.inputs[1], rotated.inputs[1]
    return None


def _half_cache(graph: ir.Graph, full: ir.Value, half: int) -> ir.Value:
    """(B, 1, T, D) cos or sin of ``cat([freqs, freqs])`` -> (B, T, D/2), placed right after ``full``'s producer."""
    nodes = []

    def constant(values):
        nodes.append(ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(values, np.int64))},
                             name=f"{full.name}_half_{len(nodes)}"))
        return nodes[-1].outputs[0]

    sliced = ir.node("Slice", [full, constant([0]), constant([half]), constant([3])], name=f"{full.name}_half_slice")
    squeezed = ir.node("Squeeze", [sliced.outputs[0], constant([1])], name=f"{full.name}_half")
    nodes += [sliced, squeezed]
    graph.insert_after(full.producer(), nodes)
    return squeezed.outputs[0]


def unfuse_rotary(model: ir.Model) -> int:
    """The inverse, for runtimes that may not parse ``RotaryEmbedding`` (``kiln build`` for TensorRT): each node back to
    ``x * cos + rotate_half(x) * sin`` with full-width (B, 1, T, D) caches rebuilt from the half ones."""
    graph, full, count = model.graph, {}, 0
    for node in [n for n in graph if n.op_type == "RotaryEmbedding" and n.domain in ("", "ai.onnx")]:
        if node.attributes.get_int("interleaved", 0) or len(node.inputs) > 3 and node.inputs[3] is not None:
            continue  # only the form fuse_rotary writes
        x, cos_half, sin_half = node.inputs[:3]
        nodes = []

        def add(op, inputs, outputs=1, **attributes):
            nodes.append(ir.node(op, inputs, attributes=attributes, num_outputs=outputs,
                                 name=f"{node.name}_{op.lower()}_{len(nodes)}"))
            return nodes[-1].outputs if outputs > 1 else nodes[-1].outputs[0]

        def widen(half: ir.Value) -> ir.Value:
            if half not in full:
                axes = ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray([1], np.int64))},
                               name=f"{half.name}_axes")
                concat = ir.node("Concat", [half, half], attributes={"axis": -1}, name=f"{half.name}_full")
                unsqueeze = ir.node("Unsqueeze", [concat.outputs[0], axes.outputs[0]], name=f"{half.name}_full4d")
                graph.insert_after(half.producer(), [axes, concat, unsqueeze])
                full[half] = unsqueeze.outputs[0]
            return full[half]

        cos, sin = widen(cos_half), widen(sin_half)
        first, second = add("Split", [x], outputs=2, axis=-1, num_outputs=2)
        rotated = add("Concat", [add("Neg", [second]), first], axis=-1)
        out = add("Add", [add("Mul", [x, cos]), add("Mul", [rotated, sin])])
        graph.insert_before(node, nodes)
        out.shape, out.dtype = node.outputs[0].shape, node.outputs[0].dtype
        ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count
