"""Rotary position embedding as one standard ONNX ``RotaryEmbedding`` node (opset 23) per query/key tensor.

torch.onnx writes the references' ``x * cos + rotate_half(x) * sin`` as six nodes per tensor (Split, Neg, Concat,
Mul, Mul, Add): in a 30-layer decoder, 360 nodes that each decode step pays for (SmolLM2: 1,082 -> 794 nodes, decode
4.9% faster). The standard op takes the half-width caches (batch, sequence, head_dim / 2); they are sliced once from
the full-width cos/sin the graph already computes (``cat([freqs, freqs])``) and shared by every layer, which is why
this is a hand-written pass rather than an onnxscript rewrite rule (a rule's replacement is made per match). The
rewrite applies only to the exact pattern; the exporter validates the result against the reference like any graph.
:class:`UnfuseRotary` is the inverse, for runtimes that may not parse ``RotaryEmbedding`` (``kiln build``).
"""

from __future__ import annotations

import onnx_ir as ir

from kiln.exporter.passes.base import GraphPass, PassResult, Skip, standard_nodes
from kiln.exporter.passes.builder import Builder, is_op, like

NOT_ROTARY = Skip("not x * cos + rotate_half(x) * sin")


class FuseRotary(GraphPass):
    name = "rotary"

    def candidates(self, model):
        self._caches = {}
        return standard_nodes(model, "Add")

    def match(self, add: ir.Node):
        """(add, x, cos, sin) for ``Add(Mul(x, cos), Mul(Concat(Neg(Split(x)[1]), Split(x)[0]), sin))``."""
        muls = [v.producer() for v in add.inputs]
        if any(m is None or m.op_type != "Mul" for m in muls):
            return NOT_ROTARY
        for plain, rotated in (muls, muls[::-1]):
            concat = rotated.inputs[0].producer()
            if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
                continue
            neg, first = concat.inputs[0].producer(), concat.inputs[1]
            split = first.producer()
            if not is_op(neg, "Neg") or not is_op(split, "Split"):
                continue
            if len(split.outputs) != 2 or neg.inputs[0] is not split.outputs[1] or first is not split.outputs[0]:
                continue
            x = split.inputs[0]
            if plain.inputs[0] is not x or concat.attributes.get_int("axis") not in (-1, 3):
                continue
            if split.attributes.get_int("axis") not in (-1, 3) or (len(split.inputs) > 1 and split.inputs[1] is not None):
                continue
            if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
                return Skip("x is not (B, H, T, D) with a static head size")
            return add, x, plain.inputs[1], rotated.inputs[1]
        return NOT_ROTARY

    def rewrite(self, model, match, result: PassResult) -> None:
        add, x, cos, sin = match
        graph = model.graph
        if (cos, sin) not in self._caches:
            half = x.shape[3] // 2
            self._caches[cos, sin] = (_half_cache(graph, cos, half), _half_cache(graph, sin, half))
        cos_half, sin_half = self._caches[cos, sin]
        node = ir.node("RotaryEmbedding", [x, cos_half, sin_half], attributes={"interleaved": 0},
                       name=f"{add.name}_rotary")
        graph.insert_before(add, node)
        like(node.outputs[0], add.outputs[0])
        ir.convenience.replace_all_uses_with(add.outputs[0], node.outputs[0], replace_graph_outputs=True)


def _half_cache(graph: ir.Graph, full: ir.Value, half: int) -> ir.Value:
    """(B, 1, T, D) cos or sin of ``cat([freqs, freqs])`` -> (B, T, D/2), placed right after ``full``'s producer."""
    b = Builder(f"{full.name}_half")
    starts, ends, axis, squeezed_axis = b.const([0]), b.const([half]), b.const([3]), b.const([1])
    sliced = b.op("Slice", [full, starts, ends, axis], name=f"{full.name}_half_slice")
    out = b.op("Squeeze", [sliced, squeezed_axis], name=f"{full.name}_half")
    b.insert_after(graph, full.producer())
    return out


class UnfuseRotary(GraphPass):
    """Each ``RotaryEmbedding`` that FuseRotary writes back to ``x * cos + rotate_half(x) * sin``, with full-width
    (B, 1, T, D) caches rebuilt from the half ones (once per cache)."""

    name = "unfuse rotary"

    def candidates(self, model):
        self._full = {}
        return standard_nodes(model, "RotaryEmbedding")

    def match(self, node):
        if node.attributes.get_int("interleaved", 0) or len(node.inputs) > 3 and node.inputs[3] is not None:
            return Skip("interleaved, or with position ids: not the form FuseRotary writes")
        return node

    def rewrite(self, model, node: ir.Node, result: PassResult) -> None:
        graph = model.graph
        x, cos_half, sin_half = node.inputs[:3]
        cos, sin = self._widen(graph, cos_half), self._widen(graph, sin_half)
        b = Builder(node.name)
        first, second = b.op("Split", [x], outputs=2, axis=-1, num_outputs=2)
        rotated = b.op("Concat", [b.op("Neg", [second]), first], axis=-1)
        out = b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rotated, sin])])
        b.insert_before(graph, node)
        like(out, node.outputs[0])
        ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
        graph.remove(node, safe=True)

    def _widen(self, graph: ir.Graph, half: ir.Value) -> ir.Value:
        if half not in self._full:
            b = Builder(half.name)
            axes = b.const([1], name=f"{half.name}_axes")
            concat = b.op("Concat", [half, half], name=f"{half.name}_full", axis=-1)
            self._full[half] = b.op("Unsqueeze", [concat, axes], name=f"{half.name}_full4d")
            b.insert_after(graph, half.producer())
        return self._full[half]

    def finish(self, model, result) -> None:
        pass  # nothing is left unused
