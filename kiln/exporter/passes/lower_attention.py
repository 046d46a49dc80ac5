"""Lower the fused ``Attention`` nodes for TensorRT, and back again for onnxruntime.

``LowerForTensorRT``: an encoder ``Attention`` (no KV cache) stays: TensorRT >= 10.14 parses it into its own fused
attention. A decoder ``Attention`` with past inputs and present outputs cannot stay (TensorRT's has one output and no
past), so it becomes ``Concat(past, new)`` for each present plus the kiln plugin node over the whole cache
(:mod:`kiln.kernels.attention.trt_plugin`). The plugin takes per-row key ranges instead of a mask; they are read off
the mask's last query row (first attended key, number of attended keys), computed once per mask and shared by every
layer. That is exact for kiln's decoder masks (causality folded into left padding, the way kiln batches prompts): the
last query row sees every valid key of its row. Query rows that see nothing (left-padding queries) get zeros, as the
spec says, where the exported mask let them attend everything; what they produce lands only at padded positions,
which every real query masks out. A sliding window is not expressible, so the pass leaves such nodes alone (the
caller says so: the window is a config fact the graph does not show).

``DecomposePlugin``, the inverse, replaces each plugin node by standard ONNX (the mask rebuilt from the ranges, ``Attention`` without a
cache, fully masked rows zeroed) so that onnxruntime can check a lowered graph against the original.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from kiln.exporter.passes.base import GraphPass, PassResult, Skip, standard_nodes
from kiln.exporter.passes.builder import Builder
from kiln.kernels.attention import trt_plugin

log = logging.getLogger("kiln")
_MAX_INT64 = np.iinfo(np.int64).max
ENCODER = "encoder attention (no KV cache): TensorRT parses it"


class LowerForTensorRT(GraphPass):
    """Decoder attention nodes to the kiln plugin; ``details``: {"kept": encoder nodes left as Attention, "plugin":
    decoder nodes lowered, "skipped": decoder nodes that could not be}. ``aot`` goes on the plugin nodes (TensorRT
    >= 10.9); ``sliding_window``, a config fact the graph does not show, keeps a decoder from being lowered."""

    name = "lower attention for TensorRT"

    def __init__(self, *, aot: bool | None = None, sliding_window: int | None = None):
        self.aot, self.sliding_window = aot, sliding_window

    def candidates(self, model):
        self._ranges = {}
        return standard_nodes(model, "Attention")

    def match(self, node):
        if not _has_cache(node):
            if _returns_probs(node):
                log.warning("lower_for_tensorrt: %s returns attention probabilities (qk_matmul_output); TensorRT's "
                            "Attention has one output. Export without --output-attentions for TensorRT.", node.name)
            return Skip(ENCODER)
        reason = _why_not(node, self.sliding_window)
        return Skip(reason) if reason else node

    def skipped(self, model, node, skip: Skip) -> None:
        if skip.reason != ENCODER:
            log.warning("lower_for_tensorrt: %s stays an ONNX Attention node: %s.", node.name, skip.reason)

    def rewrite(self, model, node: ir.Node, result: PassResult) -> None:
        mask = node.inputs[3]
        if mask not in self._ranges:
            self._ranges[mask] = _key_ranges(model.graph, node, mask)
        _replace_with_plugin(model.graph, node, *self._ranges[mask], aot=self.aot)

    def finish(self, model, result) -> None:
        model.opset_imports[trt_plugin.DOMAIN] = 1

    def call(self, model: ir.Model) -> PassResult:
        result = super().call(model)
        kept = result.skipped[ENCODER]
        result.details.update(kept=kept, plugin=result.rewritten, skipped=sum(result.skipped.values()) - kept)
        return result


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
    b = Builder("kiln_key_ranges")
    last = b.op("Slice", [mask, b.const([-1]), b.const([_MAX_INT64]), b.const([2])])  # (B, 1, 1, S)
    row = b.op("Cast", [last], to=ir.DataType.FLOAT)  # ArgMax/ReduceSum on floats: the types every runtime takes
    flat = b.const([-1])
    starts = b.op("Reshape", [b.op("ArgMax", [row], axis=3, keepdims=0), flat])  # (B,) int64: the first True
    count = b.op("Reshape", [b.op("ReduceSum", [row, b.const([3])], keepdims=0), flat])  # (B,) float
    starts = b.op("Cast", [starts], to=ir.DataType.INT32)
    lengths = b.op("Add", [starts, b.op("Cast", [count], to=ir.DataType.INT32)])
    starts.name, lengths.name = "kiln_key_starts", "kiln_key_lengths"
    b.insert_before(graph, before)
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


class DecomposePlugin(GraphPass):
    """The inverse: every kiln plugin node as standard ONNX with the kernel's semantics (onnxruntime can then check a
    lowered graph against the original)."""

    name = "decompose the TensorRT plugin"

    def candidates(self, model):
        return [n for n in model.graph if n.domain == trt_plugin.DOMAIN and n.op_type == trt_plugin.PLUGIN_NAME]

    def match(self, node):
        return node

    def rewrite(self, model, node: ir.Node, result: PassResult) -> None:
        _decompose_one(model.graph, node)

    def finish(self, model, result) -> None:
        if not any(n.domain == trt_plugin.DOMAIN for n in model.graph):
            model.opset_imports.pop(trt_plugin.DOMAIN, None)


def _decompose_one(graph: ir.Graph, node: ir.Node) -> None:
    q, k, v, starts, lengths = node.inputs
    b = Builder(f"{node.name}_ref")

    def length(x, axis):  # a scalar int64: x.shape[axis]
        return b.op("Squeeze", [b.op("Shape", [x], start=axis, end=axis + 1), b.const([0])])

    zero, one = b.const(0), b.const(1)
    T, S = length(q, 2), length(k, 2)
    j = b.op("Range", [zero, S, one])  # (S,) key index
    i = b.op("Unsqueeze", [b.op("Range", [zero, T, one]), b.const([1])])  # (T, 1) query index
    causal = node.attributes.get_int("causal", 1)
    # Bottom-right causal: query i sees j <= i + S - T. Without causality every j < S passes the same test at i + S.
    limit = b.op("Add", [i, b.op("Sub", [S, T]) if causal else S])  # (T, 1)
    rows = b.op("LessOrEqual", [j, limit]) if causal else b.op("Less", [j, limit])  # (T, S)
    lo = b.op("Unsqueeze", [b.op("Cast", [starts], to=ir.DataType.INT64), b.const([1])])  # (B, 1)
    hi = b.op("Unsqueeze", [b.op("Cast", [lengths], to=ir.DataType.INT64), b.const([1])])
    keys = b.op("And", [b.op("GreaterOrEqual", [j, lo]), b.op("Less", [j, hi])])  # (B, S)
    keys = b.op("Unsqueeze", [keys, b.const([1, 2])])  # (B, 1, 1, S)
    mask = b.op("And", [keys, rows])  # (B, 1, T, S): T explicit, as onnxruntime's Attention wants
    y = b.op("Attention", [q, k, v, mask], scale=node.attributes.get_float("scale"))
    # A query row that sees no key outputs zeros (the spec); onnxruntime's softmax over nothing would not.
    seen = b.op("Cast", [b.op("ReduceMax", [b.op("Cast", [mask], to=ir.DataType.INT32), b.const([3])])],
                to=ir.DataType.BOOL)  # (B, 1, T, 1)
    out = b.op("Where", [seen, y, b.op("CastLike", [zero, q])])
    b.insert_before(graph, node)
    old = node.outputs[0]
    name, shape, type_ = old.name, old.shape, old.type
    ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name, out.shape, out.type = name, shape, type_
