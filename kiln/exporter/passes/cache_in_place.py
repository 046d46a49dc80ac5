"""Decoder attention over a KV cache written in place: a buffer the runtime allocates once per generation.

The standard ``Attention`` node returns ``present = concat(past, new)``: every decode step copies the whole cache, and
onnxruntime's kernel for it (as its ``GroupQueryAttention``) runs one query row per head against the cache, packing the
transposed keys for each head again. At long contexts that is most of a step (benchmarks/RESULTS.md, "Decoder
attention over an in-place cache"). This pass rewrites each layer's 3-D ``Attention`` with a KV cache into:

- ``TensorScatter`` (opset 24) writing the step's keys and values into ``past_key_values.{i}.*``, a buffer of
  ``cache_capacity`` positions, at ``write_indices = total_sequence - sequence`` (every row: kiln's batches are
  left-padded, so all rows have the same length). onnxruntime writes in place when the runtime binds the present to
  the past's buffer (``MayInplace``), so nothing is copied;
- the queries of each key/value head's group folded into one matrix (B, Hkv, G * S, D) and one ``FusedMatMul``
  (``transB``) against the whole buffer: a GEMM of G rows per key head instead of G GEMVs;
- the graph's own mask (causal and padding) made additive and padded with the float minimum up to the capacity, so the
  positions past ``total_sequence`` (unwritten, or left from a cut-back) are never attended; Softmax; MatMul with the
  value buffer; the output merged back to (B, S, H * D).

The graph returns the buffers as ``present.{i}.*`` (B, Hkv, cache_capacity, D): the runtime reads the first
``total_sequence`` positions (``kiln.runtime.generate.loop.DecoderSession``). A caller of the concatenating
convention (past = the positions before the step; the validator, the accuracy gate) gets ``concat(past, new)`` from
kiln's onnxruntime engine, which copies such a past into a buffer of exactly past + sequence positions.

Layers whose cache a sliding window bounds (Gemma's local layers, past axis ``past_window``) keep their concatenated
cache, which stops growing; the runtime binds buffers for the others beside them. Any other layer outside the pattern
(soft-capping, probabilities returned, 4-D attention) leaves the whole graph as it is.

:class:`CacheConcat` is the inverse, for ``kiln build``: TensorRT's lowering takes the standard node back.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from kiln.exporter.passes.base import GraphPass, PassResult, Skip, standard_nodes
from kiln.exporter.passes.builder import Builder

CAPACITY = "cache_capacity"  # the past/present axis name the runtime recognises
METADATA = "kiln.cache_in_place"  # on each layer's FusedMatMul: the Attention node's attributes, for the inverse
MIN = float(np.finfo(np.float32).min)


class CacheInPlace(GraphPass):
    name = "cache in place"

    def candidates(self, model):
        return [model]

    def match(self, model: ir.Model):
        graph = model.graph
        inputs, outputs = {v.name: v for v in graph.inputs}, {v.name for v in graph.outputs}
        layers = [n for n in standard_nodes(model, "Attention") if len(n.inputs) > 4 and n.inputs[4] is not None]
        if not layers:
            return Skip("no attention with a KV cache")
        if "input_ids" not in inputs or "attention_mask" not in inputs:
            return Skip("no input_ids / attention_mask inputs")
        found = []
        for node in layers:
            q, k, v, mask, past_k, past_v = node.inputs[:6]
            if past_k.shape is not None and len(past_k.shape) == 4 and str(past_k.shape[2]) == "past_window":
                continue  # a window-bounded cache stays concatenated: it stops growing
            heads, kv_heads = node.attributes.get_int("q_num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
            if not heads or not kv_heads or heads % kv_heads:
                return Skip(f"{node.name} is not 3-D attention with whole key/value groups")
            if node.attributes.get_float("softcap", 0.0) or node.attributes.get_int("is_causal", 0):
                return Skip(f"{node.name} soft-caps its scores or is causal by attribute")
            if len(node.outputs) > 3 and node.outputs[3] is not None and node.outputs[3].uses():
                return Skip(f"{node.name} returns its probabilities")
            if mask is None or mask.dtype not in (ir.DataType.BOOL, ir.DataType.FLOAT):
                return Skip(f"{node.name} has no bool or float mask")
            if q.dtype != ir.DataType.FLOAT:
                return Skip(f"{node.name} is not float32")
            for past, present in ((past_k, node.outputs[1]), (past_v, node.outputs[2])):
                shape = past.shape
                if past.name not in inputs or len(past.uses()) != 1 or shape is None or len(shape) != 4 or \
                        not isinstance(shape[3], int) or str(shape[2]) != "past_sequence":
                    return Skip(f"{node.name}'s cache is not a (B, Hkv, past_sequence, D) graph input read once")
                if present is None or present.name not in outputs:
                    return Skip(f"{node.name}'s present is not a graph output")
            found.append((node, heads, kv_heads, past_k.shape[3]))
        return found or Skip("every layer's cache is window-bounded")

    def rewrite(self, model, layers, result: PassResult) -> None:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        first = layers[0][0]
        b = Builder("cache_in_place")
        one = b.const([1])

        def dim(value, axis):
            return b.op("Slice", [b.op("Shape", [value]), b.const([axis]), b.const([axis + 1])])

        batch, rows = dim(inputs["input_ids"], 0), dim(inputs["input_ids"], 1)
        total, capacity = dim(inputs["attention_mask"], 1), dim(first.inputs[4], 2)
        write = b.op("Expand", [b.op("Sub", [total, rows]), batch])  # (B,): where the step's keys go
        pads = b.op("Concat", [b.const([0] * 7), b.op("Sub", [capacity, total])], axis=0)
        biases = {}  # one additive (B, 1, 1, S, capacity) bias per distinct mask (usually one for all layers)
        for node, *_ in layers:
            mask = node.inputs[3]
            if mask.name not in biases:
                additive = mask if mask.dtype == ir.DataType.FLOAT else \
                    b.op("Where", [mask, b.const(0.0, np.float32), b.const(MIN, np.float32)])
                padded = b.op("Pad", [additive, pads, b.const(MIN, np.float32)], mode="constant")
                biases[mask.name] = b.op("Unsqueeze", [padded, one])
        b.insert_before(graph, first)
        for node, heads, kv_heads, head_dim in layers:
            self._layer(graph, node, heads, kv_heads, head_dim, write, capacity, biases[node.inputs[3].name])
        for name in {n.inputs[4].name for n, *_ in layers} | {n.inputs[5].name for n, *_ in layers}:
            value = inputs[name]
            value.shape = ir.Shape([value.shape[0], value.shape[1], ir.SymbolicDim(CAPACITY), value.shape[3]])
        opsets = model.opset_imports
        opsets[""] = max(opsets.get("", 24), 24)  # TensorScatter
        opsets.setdefault("com.microsoft", 1)  # FusedMatMul
        result.details["layers"] = len(layers)  # the others (window-bounded) stay concatenated

    @staticmethod
    def _layer(graph, node, heads, kv_heads, head_dim, write, capacity, bias) -> None:
        q, k, v, _, past_k, past_v = node.inputs[:6]
        out, present_k, present_v = node.outputs[:3]
        group, b = heads // kv_heads, Builder(node.name)
        scale = node.attributes.get_float("scale", head_dim ** -0.5)

        def kv_heads_first(x):  # (B, S, Hkv * D) -> (B, Hkv, S, D)
            return b.op("Transpose", [b.op("Reshape", [x, b.const([0, 0, kv_heads, head_dim])])], perm=[0, 2, 1, 3])

        keys = b.op("TensorScatter", [past_k, kv_heads_first(k), write], axis=2, name=f"{node.name}_write_key")
        values = b.op("TensorScatter", [past_v, kv_heads_first(v), write], axis=2, name=f"{node.name}_write_value")
        # (B, S, H * D) -> (B, Hkv, G, S, D) -> (B, Hkv, G * S, D): each key head's queries as one matrix
        grouped = b.op("Transpose", [b.op("Reshape", [q, b.const([0, 0, kv_heads, group, head_dim])])],
                       perm=[0, 2, 3, 1, 4])
        queries = b.op("Reshape", [grouped, b.const([0, kv_heads, -1, head_dim])])
        scores = b.op("FusedMatMul", [queries, keys], domain="com.microsoft", transB=1, alpha=scale)
        scores.producer().metadata_props[METADATA] = json.dumps(
            {"q_num_heads": heads, "kv_num_heads": kv_heads, "scale": scale})
        # (B, Hkv, G * S, C) -> (B, Hkv, G, S, C) + (B, 1, 1, S, C): the mask per query row, over the capacity
        scores_5d = b.op("Concat", [b.const([0, kv_heads, group, -1]), capacity], axis=0)
        masked = b.op("Add", [b.op("Reshape", [scores, scores_5d]), bias])
        probs = b.op("Reshape", [b.op("Softmax", [masked], axis=-1), b.op("Concat", [b.const([0, kv_heads, -1]),
                                                                                    capacity], axis=0)])
        context = b.op("Reshape", [b.op("MatMul", [probs, values]), b.const([0, kv_heads, group, -1, head_dim])])
        merged = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 3, 1, 2, 4]), b.const([0, 0, heads * head_dim])])
        b.insert_before(graph, node)
        for old, new in ((out, merged), (present_k, keys), (present_v, values)):
            new.dtype = old.dtype
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        for old, new in ((present_k, keys), (present_v, values)):  # the graph outputs keep their names
            name = old.name
            old.name, new.name = f"{name}_replaced", name
        merged.shape = out.shape
        for value in (keys, values):
            value.shape = ir.Shape([past_k.shape[0], kv_heads, ir.SymbolicDim(CAPACITY), head_dim])

    def finish(self, model, result) -> None:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)


class CacheConcat(GraphPass):
    """The inverse of :class:`CacheInPlace`: each layer's standard 3-D ``Attention`` node with its past and present
    (``concat(past, new)``) again, found from the FusedMatMul that carries the node's attributes."""

    name = "cache concatenated"

    def candidates(self, model):
        return [n for n in model.graph if n.op_type == "FusedMatMul" and METADATA in n.metadata_props]

    def match(self, node):
        def back(value, *op_types):  # the first input of the chain of producers of these types, else None
            for op_type in op_types:
                producer = value.producer() if value is not None else None
                if producer is None or producer.op_type != op_type:
                    return None
                value = producer.inputs[0]
            return value

        def forward(value, *op_types):  # the nodes reading value, then their outputs, one each, else None
            nodes = []
            for op_type in op_types:
                readers = [use.node for use in value.uses() if use.node.op_type == op_type]
                if len(readers) != 1:
                    return None
                nodes.append(readers[0])
                value = readers[0].outputs[0]
            return nodes

        miss = Skip("not the pattern CacheInPlace writes")
        write_key = node.inputs[1].producer()
        chain = forward(node.outputs[0], "Reshape", "Add", "Softmax", "Reshape", "MatMul", "Reshape", "Transpose",
                        "Reshape")
        q = back(node.inputs[0], "Reshape", "Transpose", "Reshape")
        if write_key is None or write_key.op_type != "TensorScatter" or chain is None or q is None:
            return miss
        add, matmul = chain[1], chain[4]
        write_value = matmul.inputs[1].producer()
        additive = back(add.inputs[1], "Unsqueeze", "Pad")
        k, v = back(write_key.inputs[1], "Transpose", "Reshape"), \
            back(write_value.inputs[1], "Transpose", "Reshape") if write_value is not None else None
        if write_value is None or write_value.op_type != "TensorScatter" or additive is None or k is None or v is None:
            return miss
        where = additive.producer()  # a bool mask was made additive by Where(mask, 0, min)
        mask = where.inputs[0] if where is not None and where.op_type == "Where" else additive
        return {"q": q, "k": k, "v": v, "mask": mask, "writes": (write_key, write_value), "out": chain[-1].outputs[0],
                "attributes": json.loads(node.metadata_props[METADATA])}

    def rewrite(self, model, layer: dict, result: PassResult) -> None:
        graph = model.graph
        write_key, write_value = layer["writes"]
        pasts = write_key.inputs[0], write_value.inputs[0]
        attributes = layer["attributes"]
        attention = ir.node("Attention", [layer["q"], layer["k"], layer["v"], layer["mask"], *pasts], num_outputs=3,
                            attributes={"q_num_heads": attributes["q_num_heads"],
                                        "kv_num_heads": attributes["kv_num_heads"], "scale": float(attributes["scale"])},
                            name=f"{write_key.name.removesuffix('_write_key')}_concat")
        graph.insert_before(write_key, attention)
        out, presents = attention.outputs[0], attention.outputs[1:]
        ir.convenience.replace_all_uses_with(layer["out"], out, replace_graph_outputs=True)
        out.dtype, out.shape = layer["out"].dtype, layer["out"].shape
        for write, present in zip(layer["writes"], presents):
            old = write.outputs[0]
            ir.convenience.replace_all_uses_with(old, present, replace_graph_outputs=True)
            name = old.name
            old.name, present.name = f"{name}_in_place", name
            present.dtype = old.dtype
            present.shape = ir.Shape([old.shape[0], old.shape[1], ir.SymbolicDim("total_sequence"), old.shape[3]])
        for past in pasts:
            if past.shape is not None and str(past.shape[2]) == CAPACITY:
                past.shape = ir.Shape([past.shape[0], past.shape[1], ir.SymbolicDim("past_sequence"), past.shape[3]])
