"""Packed projections: the MatMuls that read one activation with constant weights become one MatMul and a Split.

A LLaMA layer projects its normed input three times (q, k, v) and its second normed input twice (gate, up): five
products of the same rows with different weights. One (K, N1 + N2 + ...) product reads the activation once and runs
one kernel instead of several smaller ones; its Split hands each consumer the columns it had. Column n of the packed
product is column n of one original weight, so the result is the same numbers (the GEMM's blocking may round
differently) and the quantizers, which quantize per output column (MatMulNBits: blocks along K per column), store the
same integers. Measured on SmolLM2-135M (onnxruntime CPU, interleaved, 16 rounds; benchmarks/RESULTS.md): decode
-6% fp32, -4% int8, -6% int4 per token, prefill -1% to -5%, the same greedy tokens.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from kiln.exporter.passes.base import GraphPass, PassResult, Skip
from kiln.exporter.passes.builder import initializer


class PackProjections(GraphPass):
    """Every activation read by two or more constant-weight MatMuls: one packed MatMul and a Split."""

    name = "pack projections"

    def candidates(self, model):
        readers: dict[ir.Value, list[ir.Node]] = defaultdict(list)
        for node in model.graph:
            if _is_projection(node):
                readers[node.inputs[0]].append(node)
        self._order = {node: i for i, node in enumerate(model.graph)}
        return list(readers.values())

    def match(self, nodes: list[ir.Node]):
        if len(nodes) < 2:
            return Skip("one projection reads the activation")
        weights = [n.inputs[1].const_value.numpy() for n in nodes]  # read only where there is something to pack
        if len({(w.shape[0], w.dtype) for w in weights}) != 1:
            return Skip("the weights differ in rows or type")
        return nodes, weights

    def rewrite(self, model, match, result: PassResult) -> None:
        nodes, weights = match
        graph = model.graph
        first = min(nodes, key=self._order.__getitem__)
        name = f"{first.name}_packed"
        weight = initializer(graph, f"{name}_weight", np.concatenate(weights, axis=1))
        sizes = initializer(graph, f"{name}_sizes", np.array([w.shape[1] for w in weights], dtype=np.int64))
        x = nodes[0].inputs[0]
        matmul = ir.node("MatMul", [x, weight], name=name)
        split = ir.node("Split", [matmul.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(nodes),
                        name=f"{name}_split")
        graph.insert_before(first, [matmul, split])
        outs = [n.outputs[0] for n in nodes]
        matmul.outputs[0].dtype = outs[0].dtype
        if outs[0].shape is not None:
            matmul.outputs[0].shape = ir.Shape([*outs[0].shape[:-1], int(weight.shape[1])])
        for old, new in zip(outs, split.outputs):
            new.dtype, new.shape = old.dtype, old.shape
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        for node in nodes:
            old_weight = node.inputs[1]
            graph.remove(node, safe=True)
            if not old_weight.uses() and old_weight.name in graph.initializers:
                del graph.initializers[old_weight.name]

    def finish(self, model, result) -> None:
        pass  # the rewrite removed what it replaced


def _is_projection(node: ir.Node) -> bool:
    """``MatMul(x, W)`` with x computed and W a stored (K, N) constant."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    x, w = node.inputs
    if x is None or x.is_initializer() or w is None or w.const_value is None or not w.is_initializer():
        return False
    return w.shape is not None and len(w.shape) == 2
