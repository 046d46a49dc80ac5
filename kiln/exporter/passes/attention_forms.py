"""Encoder attention in the form a target runs fastest, chosen by measurement (``benchmarks/bench_attention_forms.py``).

torch.onnx writes each layer as ``MatMul+Add`` for q, k and v, each followed by ``Reshape -> Transpose`` to
(B, H, T, D), one standard ONNX ``Attention`` node, then ``Transpose -> Reshape`` back to (B, T, C), with a bool
(B, 1, T, T) mask expanded from ``attention_mask``. The forms:

- ``onnx``: that graph, as traced.
- ``onnx-3d``: the same ``Attention`` op fed (B, T, C) directly (``q_num_heads``/``kv_num_heads``), without the four
  Reshape/Transpose pairs per layer. Still standard ONNX. Built in ``attention_3d.py``, beside its inverse.
- ``onnx-packed``: ``onnx-3d`` with q, k and v from one (C, 3C) MatMul and a Split.
- ``contrib``: onnxruntime's ``com.microsoft.Attention``: the input projection inside the op (one packed GEMM), the
  raw (B, T) ``attention_mask`` as its mask, output (B, T, C). The form onnxruntime's own BERT fusions produce.
- ``contrib-mha``: onnxruntime's ``com.microsoft.MultiHeadAttention``: q, k, v from their own MatMuls (bias-free), the
  three biases added inside the op, the raw (B, T) mask as ``key_padding_mask``, output (B, T, C); the op that
  onnxruntime's CUDA provider runs with its flash/memory-efficient attention kernels.
- ``decomposed``: MatMul, Where (mask), Softmax, MatMul: no fused node, but the two activation products become
  ordinary MatMuls that int8 quantization can take (as Optimum's int8 export does).

Each rewrite applies to a layer only where the pattern is exactly the one above (any other layer is left as it is,
with the reason counted), so the result computes the same function; the exporter validates it against the reference
like any graph. Attention that returns probabilities (``--output-attentions``) or has a KV cache is never rewritten.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from kiln.exporter.passes.attention_3d import standard_3d
from kiln.exporter.passes.base import GraphPass, PassResult, Skip, standard_nodes
from kiln.exporter.passes.builder import Builder, from_heads, initializer, is_op, is_transpose, like, only_reader
from kiln.exporter.plan import FORMS


@dataclasses.dataclass
class EncoderLayer:
    """One layer's traced attention: the node, its q/k/v projections and the (B, T, C) value it ends in."""

    node: ir.Node
    heads: int
    head_dim: int
    projections: list[dict]  # per q, k, v: {"x": input, "W": weight, "b": bias, "y": MatMul + Add output}
    out: ir.Value
    scale: float | None
    padding: ir.Node | None = None  # the Unsqueeze of attention_mask the contrib forms read the raw mask from

    @property
    def scale_attribute(self) -> dict:
        return {} if self.scale is None else {"scale": self.scale}


class EncoderAttention(GraphPass):
    """Rewrite every traced encoder attention layer into ``form``."""

    def __init__(self, form: str):
        if form not in FORMS or form == "onnx":
            raise ValueError(f"attention form {form!r}: choose one of {', '.join(FORMS[1:])}")
        self.form, self.name = form, f"attention form {form}"
        self._masks: dict = {}

    def candidates(self, model):
        self._masks = {}
        return standard_nodes(model, "Attention")

    def match(self, node):
        layer = match_encoder(node)
        if isinstance(layer, Skip) or not self.form.startswith("contrib"):
            return layer
        layer.padding = padding_mask(node.inputs[3])
        if layer.padding is None:
            return Skip("the mask is not Expand(Cast(Unsqueeze(attention_mask, [1, 2])))")
        return layer

    def rewrite(self, model, layer: EncoderLayer, result: PassResult) -> None:
        graph = model.graph
        if self.form == "decomposed":  # replaces the node alone: its (B, H, T, D) inputs and output stay
            out = decomposed(graph, layer)
            ir.convenience.replace_all_uses_with(layer.node.outputs[0], out, replace_graph_outputs=True)
            return
        if self.form in ("onnx-3d", "onnx-packed"):
            out = standard_3d(graph, layer, packed=self.form == "onnx-packed")
        else:
            mask = self._raw_mask(graph, layer.padding)
            out = (contrib if self.form == "contrib" else multi_head)(graph, layer, mask)
        ir.convenience.replace_all_uses_with(layer.out, out, replace_graph_outputs=True)

    def finish(self, model, result) -> None:
        if self.form.startswith("contrib"):
            model.opset_imports["com.microsoft"] = 1
        super().finish(model, result)  # the old projections, reshapes and weights

    def _raw_mask(self, graph: ir.Graph, unsqueeze: ir.Node) -> ir.Value:
        """The int32 (B, S) padding mask, cast once and shared by every layer."""
        if unsqueeze not in self._masks:
            cast = ir.node("Cast", [unsqueeze.inputs[0]], attributes={"to": ir.DataType.INT32}, name="kiln_mask_index")
            graph.insert_after(unsqueeze, cast)
            cast.outputs[0].name = "kiln_mask_index"
            self._masks[unsqueeze] = cast.outputs[0]
        return self._masks[unsqueeze]


def match_encoder(node: ir.Node) -> EncoderLayer | Skip:
    """The traced encoder pattern around one Attention node."""
    if len(node.inputs) < 4 or any(v is not None for v in node.inputs[4:]):
        return Skip("it has a KV cache or extra inputs")
    if any(o is not None and (o.uses() or o.is_graph_output()) for o in node.outputs[1:]):
        return Skip("its presents or probabilities are used")
    if node.attributes.get_int("is_causal", 0) or node.attributes.get_float("softcap", 0.0):
        return Skip("it is causal or soft-capped")
    q_shape = node.inputs[0].shape
    if q_shape is None or len(q_shape) != 4 or not isinstance(q_shape[1], int) or not isinstance(q_shape[3], int):
        return Skip("the query is not (B, H, T, D) with static heads")
    projections = []
    for value in node.inputs[:3]:
        y = from_heads(value)
        if y is None:
            return Skip("q, k or v is not split into heads by Reshape -> Transpose")
        add = y.producer()
        matmul = add.inputs[0].producer() if add is not None and add.op_type == "Add" else None
        if matmul is None or matmul.op_type != "MatMul":
            return Skip("q, k or v is not a MatMul + Add projection")
        weight, bias = matmul.inputs[1], add.inputs[1]
        if weight.const_value is None or bias.const_value is None:
            return Skip("a projection's weight or bias is not a constant")
        projections.append({"x": matmul.inputs[0], "W": weight, "b": bias, "y": add.outputs[0]})
    if len({id(p["x"]) for p in projections}) != 1 or node.inputs[1].shape[1] != q_shape[1]:
        return Skip("q, k and v do not come from one input with as many key/value heads as query heads")
    transpose = only_reader(node.outputs[0], "Transpose")
    reshape = only_reader(transpose.outputs[0], "Reshape") if is_transpose(transpose) else None
    if reshape is None:
        return Skip("the output is not merged back by Transpose -> Reshape")
    return EncoderLayer(node, q_shape[1], q_shape[3], projections, reshape.outputs[0],
                        node.attributes.get_float("scale", None))


def padding_mask(mask: ir.Value) -> ir.Node | None:
    """The ``Unsqueeze(attention_mask, [1, 2])`` behind a bool (B, 1, T, S) mask built as
    ``Expand(Cast(Unsqueeze(...)))``, or None if the mask is anything else."""
    value = mask
    while value is not None and value.producer() is not None and value.producer().op_type in ("Expand", "Cast"):
        value = value.producer().inputs[0]
    unsqueeze = value.producer() if value is not None else None
    if not is_op(unsqueeze, "Unsqueeze") or not unsqueeze.inputs[0].is_graph_input():
        return None
    axes = unsqueeze.inputs[1].const_value if len(unsqueeze.inputs) > 1 and unsqueeze.inputs[1] is not None else None
    if axes is None or sorted(axes.numpy().tolist()) != [1, 2]:
        return None
    return unsqueeze


def packed_qkv(graph: ir.Graph, layer: EncoderLayer) -> tuple[ir.Value, ir.Value]:
    """The three projections' weights side by side (C, 3C) and their biases (3C,), as initializers."""
    name = layer.node.name
    weight = initializer(graph, f"{name}.qkv.weight",
                         np.concatenate([p["W"].const_value.numpy() for p in layer.projections], axis=1), np.float32)
    bias = initializer(graph, f"{name}.qkv.bias",
                       np.concatenate([p["b"].const_value.numpy() for p in layer.projections]), np.float32)
    return weight, bias


def decomposed(graph: ir.Graph, layer: EncoderLayer) -> ir.Value:
    """softmax(q k^T * scale, masked) v on the traced (B, H, T, D) inputs; masked scores get float32's minimum, as
    the references do (a fully masked row averages v rather than producing NaN)."""
    node = layer.node
    q, k, v, mask = node.inputs[:4]
    scale = layer.scale if layer.scale is not None else 1.0 / float(np.sqrt(layer.head_dim))
    b = Builder(node.name)
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), b.const(scale, np.float32)])
    scores = b.op("Where", [mask, scores, b.const(np.finfo(np.float32).min, np.float32)])  # (B, H, T, S)
    out = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])  # (B, H, T, D)
    b.insert_before(graph, node)
    return like(out, node.outputs[0])


def contrib(graph: ir.Graph, layer: EncoderLayer, mask: ir.Value) -> ir.Value:
    weight, bias = packed_qkv(graph, layer)
    b = Builder()
    out = b.op("Attention", [layer.projections[0]["x"], weight, bias, mask], domain="com.microsoft",
               name=f"{layer.node.name}_contrib", num_heads=layer.heads, **layer.scale_attribute)
    b.insert_before(graph, layer.node)
    return like(out, layer.out)


def multi_head(graph: ir.Graph, layer: EncoderLayer, mask: ir.Value) -> ir.Value:
    projected = [p["y"].producer().inputs[0] for p in layer.projections]  # MatMul outputs, before their Adds
    bias = initializer(graph, f"{layer.node.name}.qkv.bias",
                       np.concatenate([p["b"].const_value.numpy() for p in layer.projections]), np.float32)
    b = Builder()
    out = b.op("MultiHeadAttention", [*projected, bias, mask], domain="com.microsoft", name=f"{layer.node.name}_mha",
               num_heads=layer.heads, **layer.scale_attribute)
    b.insert_before(graph, layer.node)
    return like(out, layer.out)
