"""Attention fed (B, T, C) straight from its projections, and the inverse that TensorRT's parser needs.

The standard ONNX ``Attention`` op takes 3-D inputs when ``q_num_heads``/``kv_num_heads`` say how to split them, so
the Reshape -> Transpose that torch.onnx writes around q, k, v and back around the output can go: eight nodes a
layer that every call pays for.

- :func:`standard_3d` builds the encoder form ``onnx-3d`` (and ``onnx-packed``: q, k, v from one (C, 3C) MatMul);
  the pass that calls it is ``attention_forms.EncoderAttention``, which matches the traced encoder layer.
- :class:`DecoderAttention3D`: decoder attention with a KV cache, RotaryEmbedding rotating the 3-D q and k itself
  (``num_heads``); the cache inputs and outputs stay (B, Hkv, S, D). Runs after ``rotary.FuseRotary``. A query or
  key normalised per head (Qwen3) keeps its (B, T, H, D) RMSNormalization and is merged back by a Reshape.
- :class:`To4D` is the inverse of both, for runtimes only known to parse (B, H, T, D) attention (``kiln build``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from kiln.exporter.passes.base import GraphPass, PassResult, Skip, standard_nodes
from kiln.exporter.passes.builder import (HEADS, Builder, from_heads, is_op, is_transpose, like, only_reader,
                                         to_heads_shape)

if TYPE_CHECKING:
    from kiln.exporter.passes.attention_forms import EncoderLayer


def standard_3d(graph: ir.Graph, layer: EncoderLayer, packed: bool) -> ir.Value:
    """The encoder layer's Attention fed its (B, T, C) projections; returns the (B, T, C) output."""
    from kiln.exporter.passes.attention_forms import packed_qkv

    node, b = layer.node, Builder(layer.node.name)
    if packed:
        weight, bias = packed_qkv(graph, layer)
        summed = b.op("Add", [b.op("MatMul", [layer.projections[0]["x"], weight], name=f"{node.name}_qkv_matmul"),
                              bias], name=f"{node.name}_qkv_add")
        q, k, v = b.op("Split", [summed], outputs=3, name=f"{node.name}_qkv_split", axis=-1, num_outputs=3)
    else:
        q, k, v = (p["y"] for p in layer.projections)
    out = b.op("Attention", [q, k, v, node.inputs[3]], name=f"{node.name}_3d", q_num_heads=layer.heads,
               kv_num_heads=layer.heads, **layer.scale_attribute)
    b.insert_before(graph, node)
    return like(out, layer.out)


class DecoderAttention3D(GraphPass):
    """Decoder attention with a KV cache fed (B, T, C): per layer the Reshape/Transpose pairs of q, k, v and of the
    output go away, RotaryEmbedding rotates the 3-D q and k (``num_heads``) and ``Attention`` takes them with
    ``q_num_heads``/``kv_num_heads``. A layer not in exactly the traced form (after FuseRotary) is left alone."""

    name = "decoder attention 3-D"

    def candidates(self, model):
        return standard_nodes(model, "Attention")

    def match(self, node):
        if len(node.inputs) < 6 or node.inputs[4] is None:
            return Skip("it has no KV cache")
        if node.attributes.get_int("q_num_heads", 0):
            return Skip("it is already 3-D")
        if len(node.outputs) > 3 and node.outputs[3] is not None and node.outputs[3].uses():
            return Skip("its probabilities are used")
        shapes = [v.shape for v in node.inputs[:2]]
        if any(s is None or len(s) != 4 or not isinstance(s[1], int) for s in shapes):
            return Skip("q or k is not (B, H, T, D) with static heads")
        inputs = []
        for index, value in enumerate(node.inputs[:3]):
            rotary = value.producer() if index < 2 else None
            if rotary is not None:
                if rotary.op_type != "RotaryEmbedding" or rotary.attributes.get_int("interleaved", 0) or \
                        "num_heads" in rotary.attributes or len(value.uses()) != 1 or \
                        (len(rotary.inputs) > 3 and rotary.inputs[3] is not None):
                    return Skip("q or k is not rotated by one plain RotaryEmbedding node")
                value = rotary.inputs[0]
            x, norm = from_heads(value), None
            if x is None and index < 2:
                norm = normed_heads(value)
            if x is None and norm is None:
                return Skip("q, k or v is not split into heads by Reshape -> Transpose")
            inputs.append((x, rotary, norm))
        transpose = only_reader(node.outputs[0], "Transpose")
        merge = only_reader(transpose.outputs[0], "Reshape") if is_transpose(transpose) else None
        if merge is None:
            return Skip("the output is not merged back by Transpose -> Reshape")
        return {"node": node, "inputs": inputs, "heads": (shapes[0][1], shapes[1][1], shapes[1][1]),
                "out": merge.outputs[0]}

    def rewrite(self, model, layer: dict, result: PassResult) -> None:
        node = layer["node"]
        for index, (x, rotary, norm) in enumerate(layer["inputs"]):
            if norm is not None:  # the norm stays on (B, T, H, D); a Reshape (free) takes the Transpose's place
                b = Builder(norm.name)
                x = b.op("Reshape", [norm.outputs[0], b.const([0, 0, -1])], name=f"{norm.name}_3d")
                x.dtype, x.shape = norm.outputs[0].dtype, from_heads_shape(norm.outputs[0].shape)
                b.insert_after(model.graph, norm)
            if rotary is None:
                node.replace_input_with(index, x)
                continue
            rotary.replace_input_with(0, x)
            rotary.attributes["num_heads"] = ir.AttrInt64("num_heads", layer["heads"][index])
            rotary.outputs[0].shape = x.shape
        node.attributes["q_num_heads"] = ir.AttrInt64("q_num_heads", layer["heads"][0])
        node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", layer["heads"][1])
        out = node.outputs[0]
        ir.convenience.replace_all_uses_with(layer["out"], out, replace_graph_outputs=True)
        out.shape = layer["out"].shape


def normed_heads(value: ir.Value) -> ir.Node | None:
    """The RMSNormalization node for ``value = Transpose(RMSNormalization(Reshape(x)))``, each read once: a query or
    key normalised per head over D before RoPE (Qwen3's q_norm / k_norm), else None."""
    transpose = value.producer()
    if not is_transpose(transpose) or len(value.uses()) != 1 or len(transpose.inputs[0].uses()) != 1:
        return None
    norm = transpose.inputs[0].producer()
    if not is_op(norm, "RMSNormalization") or norm.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    reshape = norm.inputs[0].producer()
    return norm if is_op(reshape, "Reshape") and len(norm.inputs[0].uses()) == 1 else None


def from_heads_shape(shape: ir.Shape | None) -> ir.Shape | None:
    """(B, T, H, D) -> (B, T, H * D), or None when H or D is not known."""
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in (shape[2], shape[3])):
        return None
    return ir.Shape([shape[0], shape[1], shape[2] * shape[3]])


class To4D(GraphPass):
    """The inverse of every 3-D form: each standard ``Attention`` with ``q_num_heads`` gets Reshape/Transpose to
    (B, H, T, D) around it again (before a 3-D RotaryEmbedding, where one rotates q or k)."""

    name = "attention back to 4-D"

    def candidates(self, model):
        return standard_nodes(model, "Attention")

    def match(self, node):
        return node if node.attributes.get_int("q_num_heads", 0) else Skip("it is already 4-D")

    def rewrite(self, model, node: ir.Node, result: PassResult) -> None:
        graph = model.graph
        heads = node.attributes.get_int("q_num_heads", 0)
        kv_heads = node.attributes.get_int("kv_num_heads", 0)
        heads_of, b = {0: heads, 1: kv_heads, 2: kv_heads}, Builder(node.name)
        for index in range(3):
            rotary = node.inputs[index].producer()
            if rotary is None or rotary.op_type != "RotaryEmbedding" or "num_heads" not in rotary.attributes:
                rotary = None
            consumer, slot = (rotary, 0) if rotary is not None else (node, index)
            x = consumer.inputs[slot]
            split = b.op("Reshape", [x, b.const([0, 0, heads_of[index], -1])], name=f"{node.name}_4d_reshape_{index}")
            heads_4d = b.op("Transpose", [split], name=f"{node.name}_4d_transpose_{index}", perm=list(HEADS))
            consumer.replace_input_with(slot, heads_4d)
            shape = to_heads_shape(x.shape, heads_of[index])  # (B, H, T, D), for passes that check ranks
            if shape is not None and x.dtype is not None:
                heads_4d.shape, heads_4d.dtype = shape, x.dtype
            if rotary is not None:
                rotary.attributes.pop("num_heads")
                rotary.outputs[0].shape = shape
                b.insert_before(graph, rotary)
        merged_shape = b.const([0, 0, -1])
        b.insert_before(graph, node)
        out = node.outputs[0]
        back = ir.node("Transpose", [out], attributes={"perm": list(HEADS)}, name=f"{node.name}_3d_transpose")
        merge = ir.node("Reshape", [back.outputs[0], merged_shape], name=f"{node.name}_3d_reshape")
        graph.insert_after(node, [back, merge])
        ir.convenience.replace_all_uses_with(out, merge.outputs[0], replace_graph_outputs=True)
        back.replace_input_with(0, out)  # the new Transpose reads the node's output itself
        like(merge.outputs[0], out)
        out.shape = None
        for name in ("q_num_heads", "kv_num_heads"):
            node.attributes.pop(name, None)

    def finish(self, model, result) -> None:
        pass  # nothing is left unused
