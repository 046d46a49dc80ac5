"""Decoder attention over a KV cache written in place: a buffer the runtime allocates once per generation.

The standard ``Attention`` node returns ``present = concat(past, new)``: every decode step copies the whole cache.
This pass rewrites each layer's 3-D ``Attention`` with a KV cache into one ``com.microsoft.GroupQueryAttention`` over
``past_key_values.{i}.*``, a buffer of ``cache_capacity`` positions that the runtime binds as both past and present,
so the kernel writes the step's keys and values into it and nothing is copied:

- ``seqlens_k = total_sequence - 1`` for every row and ``total_sequence_length = total_sequence``: each row writes
  at ``total_sequence - sequence`` and attends over the first ``total_sequence`` positions (kiln's batches are
  left-padded, so all rows have the same length; the kernel's own convention, a per-row length, assumes right
  padding and would write a padded row's keys in the wrong place);
- the graph's own mask (causal and padding) as the additive ``attention_bias``, so padded positions are never
  attended; the kernel applies its causal mask too, which agrees;
- queries, keys and values stay as the 3-D (B, S, heads * D) tensors the rotary nodes produce: no reshape, transpose,
  grouping or score tensor around the kernel. A decode step of SmolLM2-135M runs about 10 nodes a layer instead of 33,
  which is most of a short-context step (benchmarks/RESULTS.md, "Decoder attention over an in-place KV cache").

onnxruntime's CPU kernel takes a step of several tokens over a non-empty cache for one row at a time only; kiln's
onnxruntime engine runs such a batch row by row (``OnnxRuntimeEngine.run``). The graph returns the buffers as
``present.{i}.*`` (B, Hkv, cache_capacity, D): the runtime reads the first ``total_sequence`` positions
(``kiln.runtime.generate.loop.DecoderSession``). A caller of the concatenating convention (past = the positions
before the step; the validator, the accuracy gate) gets ``concat(past, new)`` from kiln's onnxruntime engine, which
copies such a past into a buffer of exactly past + sequence positions.

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
METADATA = "kiln.cache_in_place"  # on each GroupQueryAttention: the Attention node's attributes, for the inverse
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

        def dim(value, axis):
            return b.op("Slice", [b.op("Shape", [value]), b.const([axis]), b.const([axis + 1])])

        batch, total = dim(inputs["input_ids"], 0), dim(inputs["attention_mask"], 1)
        # every row writes at total - sequence and attends over [0, total): kiln's batches are left-padded, the
        # padding masked by the bias (the kernel's own reading of seqlens_k assumes right padding)
        last = b.op("Cast", [b.op("Expand", [b.op("Sub", [total, b.const([1])]), batch])], to=ir.DataType.INT32)
        length = b.op("Cast", [total], to=ir.DataType.INT32)
        biases = {}  # one additive (B, 1, S, T) bias per distinct mask (usually one for all layers)
        for node, *_ in layers:
            mask = node.inputs[3]
            if mask.name not in biases:
                biases[mask.name] = mask if mask.dtype == ir.DataType.FLOAT else \
                    b.op("Where", [mask, b.const(0.0, np.float32), b.const(MIN, np.float32)])
        b.insert_before(graph, first)
        for node, heads, kv_heads, head_dim in layers:
            self._layer(graph, node, heads, kv_heads, head_dim, last, length, biases[node.inputs[3].name])
        for name in {n.inputs[4].name for n, *_ in layers} | {n.inputs[5].name for n, *_ in layers}:
            value = inputs[name]
            value.shape = ir.Shape([value.shape[0], value.shape[1], ir.SymbolicDim(CAPACITY), value.shape[3]])
        model.opset_imports.setdefault("com.microsoft", 1)  # GroupQueryAttention
        result.details["layers"] = len(layers)  # the others (window-bounded) stay concatenated

    @staticmethod
    def _layer(graph, node, heads, kv_heads, head_dim, last, length, bias) -> None:
        q, k, v, _, past_k, past_v = node.inputs[:6]
        out, present_k, present_v = node.outputs[:3]
        scale = node.attributes.get_float("scale", head_dim ** -0.5)
        attention = ir.node("GroupQueryAttention", [q, k, v, past_k, past_v, last, length, None, None, None, bias],
                            domain="com.microsoft", num_outputs=3, name=f"{node.name}_in_place",
                            attributes={"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(scale)})
        attention.metadata_props[METADATA] = json.dumps({"q_num_heads": heads, "kv_num_heads": kv_heads,
                                                         "scale": scale})
        graph.insert_before(node, attention)
        merged, keys, values = attention.outputs
        for old, new in ((out, merged), (present_k, keys), (present_v, values)):
            new.dtype = old.dtype
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        for old, new in ((present_k, keys), (present_v, values)):  # the graph outputs keep their names
            name = old.name
            old.name, new.name = f"{name}_replaced", name
        merged.shape = out.shape
        for value in (keys, values):
            value.shape = ir.Shape([past_k.shape[0], kv_heads, ir.SymbolicDim(CAPACITY), head_dim])

class CacheConcat(GraphPass):
    """The inverse of :class:`CacheInPlace`: each layer's standard 3-D ``Attention`` node with its past and present
    (``concat(past, new)``) again, in place of the GroupQueryAttention that carries the node's attributes."""

    name = "cache concatenated"

    def candidates(self, model):
        return [n for n in model.graph if n.op_type == "GroupQueryAttention" and METADATA in n.metadata_props]

    def match(self, node):
        bias = node.inputs[10] if len(node.inputs) > 10 else None
        if bias is None or any(node.inputs[i] is None for i in range(5)):
            return Skip("not the pattern CacheInPlace writes")
        where = bias.producer()  # a bool mask was made additive by Where(mask, 0, min)
        mask = where.inputs[0] if where is not None and where.op_type == "Where" else bias
        return {"node": node, "mask": mask, "attributes": json.loads(node.metadata_props[METADATA])}

    def rewrite(self, model, found: dict, result: PassResult) -> None:
        graph, node = model.graph, found["node"]
        attributes = found["attributes"]
        pasts = node.inputs[3], node.inputs[4]
        attention = ir.node("Attention", [*node.inputs[:3], found["mask"], *pasts], num_outputs=3,
                            attributes={"q_num_heads": attributes["q_num_heads"],
                                        "kv_num_heads": attributes["kv_num_heads"], "scale": float(attributes["scale"])},
                            name=f"{node.name.removesuffix('_in_place')}_concat")
        graph.insert_before(node, attention)
        for old, new in zip(node.outputs, attention.outputs):
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            name = old.name
            old.name, new.name = f"{name}_in_place", name
            new.dtype, new.shape = old.dtype, old.shape
        for present in attention.outputs[1:]:
            shape = present.shape
            present.shape = ir.Shape([shape[0], shape[1], ir.SymbolicDim("total_sequence"), shape[3]])
        for past in pasts:
            if past.shape is not None and str(past.shape[2]) == CAPACITY:
                past.shape = ir.Shape([past.shape[0], past.shape[1], ir.SymbolicDim("past_sequence"), past.shape[3]])
