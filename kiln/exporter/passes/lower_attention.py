"""Lower the fused ``Attention`` nodes for TensorRT, and back again for onnxruntime.

``lower_for_tensorrt``: an encoder ``Attention`` (no KV cache) stays: TensorRT >= 10.14 parses it into its own fused
attention. A decoder ``Attention`` with past inputs and present outputs cannot stay (TensorRT's has one output and no
past), so it becomes ``Concat(past, new)`` for each present plus the kiln plugin node over the whole cache
(:mod:`kiln.kernels.attention.trt_plugin`). The plugin takes per-row key ranges instead of a mask; they are read off
the mask's last query row (first attended key, number of attended keys), computed once per mask and shared by every
layer. That is exact for kiln's decoder masks (causality folded into left padding, the way kiln batches prompts): the
last query row sees every valid key of its row. Query rows that see nothing (left-padding queries) get zeros, as the
spec says, where the exported mask let them attend everything; what they produce lands only at padded positions,
which every real query masks out. A sliding window is not expressible, so the pass leaves such nodes alone (the
caller says so: the window is a config fact the graph does not show).

``decompose`` replaces each plugin node by standard ONNX (the mask rebuilt from the ranges, ``Attention`` without a
cache, fully masked rows zeroed) so that onnxruntime can check a lowered graph against the original.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx_ir as ir

from kiln.kernels.attention import trt_plugin

log = logging.getLogger("kiln")
_MAX_INT64 = np.iinfo(np.int64).max
_names = itertools.count()  # unique names for the constants the passes add


def lower_for_tensorrt(model: ir.Model, *, aot: bool | None = None, sliding_window: int | None = None) -> dict:
    """Rewrite ``model`` in place; returns counts ``{"kept": encoder nodes left as Attention, "plugin": decoder nodes
    lowered, "skipped": decoder nodes that could not be}``. ``aot`` goes on the plugin nodes (TensorRT >= 10.9)."""
    graph, counts, ranges = model.graph, {"kept": 0, "plugin": 0, "skipped": 0}, {}
    for node in list(graph):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        if not _has_cache(node):
            if _returns_probs(node):
                log.warning("lower_for_tensorrt: %s returns attention probabilities (qk_matmul_output); TensorRT's "
                            "Attention has one output. Export without --output-attentions for TensorRT.", node.name)
            counts["kept"] += 1
            continue
        reason = _why_not(node, sliding_window)
        if reason:
            log.warning("lower_for_tensorrt: %s stays an ONNX Attention node: %s.", node.name, reason)
            counts["skipped"] += 1
            continue
        mask = node.inputs[3]
        if mask not in ranges:
            ranges[mask] = _key_ranges(graph, node, mask)
        _replace_with_plugin(graph, node, *ranges[mask], aot=aot)
        counts["plugin"] += 1
    if counts["plugin"]:
        model.opset_imports[trt_plugin.DOMAIN] = 1
    log.info("lower_for_tensorrt: %d Attention node(s) kept for TensorRT, %d lowered to %s, %d skipped",
             counts["kept"], counts["plugin"], trt_plugin.PLUGIN_ID, counts["skipped"])
    return counts


def _has_cache(node: ir.Node) -> bool:
    return len(node.inputs) > 4 and node.inputs[4] is not None


def _returns_probs(node: ir.Node) -> bool:
    return len(node.outputs) > 3 and bool(node.outputs[3].uses() or node.outputs[3].is_graph_output())


def _why_not(node: ir.Node, sliding_window: int | None) -> str | None:
    """The reason this decoder Attention node cannot become the plugin, or None."""
    q, k, v, mask = node.inputs[:4]
    if sliding_window:
        return f"sliding-window attention ({sliding_window} tokens) is not expressible as per-row key ranges"
    if any(x is None or x.shape is None or len(x.shape) != 4 for x in (q, k, v)):
        return "query/key/value are not 4-D (batch, heads, sequence, head_dim) with known rank"
    if mask is None or mask.dtype != ir.DataType.BOOL:
        return "it has no boolean mask to read the key ranges from"
    if len(node.inputs) > 6 and node.inputs[6] is not None:
        return "it has a nonpad_kv_seqlen input"
    if node.attributes.get_float("softcap", 0.0):
        return "softcap is not supported by the kernel"
    if _returns_probs(node):
        return "its probabilities (qk_matmul_output) are used"
    heads, kv_heads = q.shape[1], k.shape[1]
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        return "the number of heads is not static"
    return trt_plugin.unsupported_head_dim(*(d if isinstance(d, int) else None for d in (q.shape[3], v.shape[3])))


def _key_ranges(graph: ir.Graph, before: ir.Node, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(key_starts, key_lengths), (B,) int32, from the mask's last query row: first attended key and their count."""
    nodes = []

    def add(op, inputs, **attributes):
        nodes.append(ir.node(op, inputs, attributes=attributes, name=f"kiln_key_ranges_{len(nodes)}"))
        return nodes[-1].outputs[0]

    last = add("Slice", [mask, _const(nodes, [-1]), _const(nodes, [_MAX_INT64]), _const(nodes, [2])])  # (B, 1, 1, S)
    row = add("Cast", [last], to=ir.DataType.FLOAT)  # ArgMax/ReduceSum on floats: the types every runtime takes
    flat = _const(nodes, [-1])
    starts = add("Reshape", [add("ArgMax", [row], axis=3, keepdims=0), flat])  # (B,) int64: the first True
    count = add("Reshape", [add("ReduceSum", [row, _const(nodes, [3])], keepdims=0), flat])  # (B,) float
    starts = add("Cast", [starts], to=ir.DataType.INT32)
    lengths = add("Add", [starts, add("Cast", [count], to=ir.DataType.INT32)])
    starts.name, lengths.name = "kiln_key_starts", "kiln_key_lengths"
    graph.insert_before(before, nodes)
    return starts, lengths


def _replace_with_plugin(graph: ir.Graph, node: ir.Node, starts: ir.Value, lengths: ir.Value, *,
                         aot: bool | None) -> None:
    q, k, v, _, past_key, past_value = node.inputs[:6]
    present_key = ir.node("Concat", [past_key, k], attributes={"axis": 2}, name=f"{node.name}_present_key")
    present_value = ir.node("Concat", [past_value, v], attributes={"axis": 2}, name=f"{node.name}_present_value")
    scale = node.attributes.get_float("scale", None) or 1.0 / float(np.sqrt(q.shape[3]))
    attributes = trt_plugin.node_attributes(num_heads=q.shape[1], kv_heads=k.shape[1], scale=scale, causal=True,
                                            aot=aot)
    plugin = ir.node(trt_plugin.PLUGIN_NAME, [q, present_key.outputs[0], present_value.outputs[0], starts, lengths],
                     attributes=attributes, domain=trt_plugin.DOMAIN, name=f"{node.name}_kiln_plugin")
    new = [present_key, present_value, plugin]
    old_values = list(node.outputs[:3])
    new_values = [plugin.outputs[0], present_key.outputs[0], present_value.outputs[0]]
    ir.convenience.replace_nodes_and_values(graph, node, [node], new, old_values, new_values)


def decompose(model: ir.Model) -> int:
    """Replace every kiln plugin node by standard ONNX with the kernel's semantics; returns how many."""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.domain == trt_plugin.DOMAIN and node.op_type == trt_plugin.PLUGIN_NAME:
            _decompose_one(graph, node)
            count += 1
    if count and not any(n.domain == trt_plugin.DOMAIN for n in graph):
        model.opset_imports.pop(trt_plugin.DOMAIN, None)
    return count


def _decompose_one(graph: ir.Graph, node: ir.Node) -> None:
    q, k, v, starts, lengths = node.inputs
    nodes = []

    def add(op, inputs, **attributes):
        nodes.append(ir.node(op, inputs, attributes=attributes, name=f"{node.name}_ref_{len(nodes)}"))
        return nodes[-1].outputs[0]

    def length(x, axis):  # a scalar int64: x.shape[axis]
        return add("Squeeze", [add("Shape", [x], start=axis, end=axis + 1), _const(nodes, [0])])

    zero, one = _const(nodes, 0), _const(nodes, 1)
    T, S = length(q, 2), length(k, 2)
    j = add("Range", [zero, S, one])  # (S,) key index
    i = add("Unsqueeze", [add("Range", [zero, T, one]), _const(nodes, [1])])  # (T, 1) query index
    causal = node.attributes.get_int("causal", 1)
    # Bottom-right causal: query i sees j <= i + S - T. Without causality every j < S passes the same test at i + S.
    limit = add("Add", [i, add("Sub", [S, T]) if causal else S])  # (T, 1)
    rows = add("LessOrEqual", [j, limit]) if causal else add("Less", [j, limit])  # (T, S)
    lo = add("Unsqueeze", [add("Cast", [starts], to=ir.DataType.INT64), _const(nodes, [1])])  # (B, 1)
    hi = add("Unsqueeze", [add("Cast", [lengths], to=ir.DataType.INT64), _const(nodes, [1])])
    keys = add("And", [add("GreaterOrEqual", [j, lo]), add("Less", [j, hi])])  # (B, S)
    keys = add("Unsqueeze", [keys, _const(nodes, [1, 2])])  # (B, 1, 1, S)
    mask = add("And", [keys, rows])  # (B, 1, T, S): T explicit, as onnxruntime's Attention wants
    y = add("Attention", [q, k, v, mask], scale=node.attributes.get_float("scale"))
    # A query row that sees no key outputs zeros (the spec); onnxruntime's softmax over nothing would not.
    seen = add("Cast", [add("ReduceMax", [add("Cast", [mask], to=ir.DataType.INT32), _const(nodes, [3])])],
               to=ir.DataType.BOOL)  # (B, 1, T, 1)
    out = add("Where", [seen, y, add("CastLike", [zero, q])])
    graph.insert_before(node, nodes)
    old = node.outputs[0]
    name, shape, type_ = old.name, old.shape, old.type
    ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name, out.shape, out.type = name, shape, type_


def _const(nodes: list, value) -> ir.Value:
    array = np.asarray(value, dtype=np.int64)
    nodes.append(ir.node("Constant", [], attributes={"value": ir.tensor(array)}, name=f"kiln_const_{next(_names)}"))
    return nodes[-1].outputs[0]
