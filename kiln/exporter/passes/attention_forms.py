"""Encoder attention in the form a target runs fastest, chosen by measurement (``benchmarks/bench_attention_forms.py``).

torch.onnx writes each layer as ``MatMul+Add`` for q, k and v, each followed by ``Reshape -> Transpose`` to
(B, H, T, D), one standard ONNX ``Attention`` node, then ``Transpose -> Reshape`` back to (B, T, C), with a bool
(B, 1, T, T) mask expanded from ``attention_mask``. The forms:

- ``onnx``: that graph, as traced.
- ``onnx-3d``: the same ``Attention`` op fed (B, T, C) directly (``q_num_heads``/``kv_num_heads``), without the four
  Reshape/Transpose pairs per layer. Still standard ONNX.
- ``onnx-packed``: ``onnx-3d`` with q, k and v from one (C, 3C) MatMul and a Split.
- ``contrib``: onnxruntime's ``com.microsoft.Attention``: the input projection inside the op (one packed GEMM), the
  raw (B, T) ``attention_mask`` as its mask, output (B, T, C). The form onnxruntime's own BERT fusions produce.
- ``decomposed``: MatMul, Where (mask), Softmax, MatMul: no fused node, but the two activation products become
  ordinary MatMuls that int8 quantization can take (as Optimum's int8 export does).

Each rewrite applies to a layer only where the pattern is exactly the one above (any other layer is left as it is and
counted), so the result computes the same function; the exporter validates it against the reference like any graph.
Attention that returns probabilities (``--output-attentions``) or has a KV cache is never rewritten.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

log = logging.getLogger("kiln")
FORMS = ("onnx", "onnx-3d", "onnx-packed", "contrib", "decomposed")


def rewrite(model: ir.Model, form: str) -> dict:
    """Rewrite ``model``'s encoder attention into ``form`` in place; returns {"rewritten": n, "kept": m}."""
    if form not in FORMS:
        raise ValueError(f"attention form {form!r}: choose one of {', '.join(FORMS)}")
    counts = {"rewritten": 0, "kept": 0}
    if form == "onnx":
        return counts
    graph, mask_cache = model.graph, {}
    for node in [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        layer = _match(node)
        if layer is None:
            counts["kept"] += 1
            continue
        if form == "decomposed":
            new = _decomposed(graph, node, layer)
            ir.convenience.replace_all_uses_with(node.outputs[0], new, replace_graph_outputs=True)
            counts["rewritten"] += 1
            continue
        if form == "contrib":
            mask = _raw_mask(graph, node.inputs[3], mask_cache)
            if mask is None:
                counts["kept"] += 1
                continue
            new = _contrib(graph, node, layer, mask)
        else:
            new = _standard_3d(graph, node, layer, packed=form == "onnx-packed")
        out = layer["out"]
        ir.convenience.replace_all_uses_with(out, new, replace_graph_outputs=True)
        counts["rewritten"] += 1
    if form == "contrib" and counts["rewritten"]:
        model.opset_imports["com.microsoft"] = 1
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)  # the old projections, reshapes and weights
    log.info("attention form %s: %d layer(s) rewritten, %d kept as traced", form, counts["rewritten"], counts["kept"])
    return counts


def to_4d(model: ir.Model) -> int:
    """The inverse for runtimes that want (B, H, T, D) attention inputs (TensorRT's ONNX parser is only known to take
    those): every 3-D standard ``Attention`` node gets Reshape/Transpose to 4-D around it again. Returns how many."""
    graph, count = model.graph, 0
    for node in [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        heads = node.attributes.get_int("q_num_heads", 0)
        kv_heads = node.attributes.get_int("kv_num_heads", 0)
        if not heads or any(v is not None for v in node.inputs[4:]):  # q_num_heads is set on 3-D attention only
            continue
        nodes, heads_of = [], {0: heads, 1: kv_heads, 2: kv_heads}

        def constant(values):
            nodes.append(ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(values, np.int64))},
                                 name=f"{node.name}_shape_{len(nodes)}"))
            return nodes[-1].outputs[0]

        for index in range(3):
            split = ir.node("Reshape", [node.inputs[index], constant([0, 0, heads_of[index], -1])],
                            name=f"{node.name}_4d_reshape_{index}")
            transpose = ir.node("Transpose", [split.outputs[0]], attributes={"perm": [0, 2, 1, 3]},
                                name=f"{node.name}_4d_transpose_{index}")
            nodes += [split, transpose]
            node.replace_input_with(index, transpose.outputs[0])
        merged_shape = constant([0, 0, -1])
        graph.insert_before(node, nodes)
        out = node.outputs[0]
        back = ir.node("Transpose", [out], attributes={"perm": [0, 2, 1, 3]}, name=f"{node.name}_3d_transpose")
        merge = ir.node("Reshape", [back.outputs[0], merged_shape], name=f"{node.name}_3d_reshape")
        graph.insert_after(node, [back, merge])
        ir.convenience.replace_all_uses_with(out, merge.outputs[0], replace_graph_outputs=True)
        back.replace_input_with(0, out)  # the new Transpose reads the node's output itself
        merge.outputs[0].shape, merge.outputs[0].dtype = out.shape, out.dtype
        out.shape = None
        for name in ("q_num_heads", "kv_num_heads"):
            node.attributes.pop(name, None)
        count += 1
    return count


def _match(node: ir.Node) -> dict | None:
    """The traced encoder pattern around one Attention node, or None."""
    if len(node.inputs) < 4 or any(v is not None for v in node.inputs[4:]):
        return None  # a KV cache or extra inputs
    if any(o is not None and (o.uses() or o.is_graph_output()) for o in node.outputs[1:]):
        return None  # presents or probabilities are used
    if node.attributes.get_int("is_causal", 0) or node.attributes.get_float("softcap", 0.0):
        return None
    q_shape = node.inputs[0].shape
    if q_shape is None or len(q_shape) != 4 or not isinstance(q_shape[1], int) or not isinstance(q_shape[3], int):
        return None
    heads, head_dim = q_shape[1], q_shape[3]
    projections = []
    for value in node.inputs[:3]:
        t = value.producer()
        if t is None or t.op_type != "Transpose" or list(t.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
            return None
        r = t.inputs[0].producer()
        if r is None or r.op_type != "Reshape" or len(value.uses()) != 1:
            return None
        add = r.inputs[0].producer()
        mm = add.inputs[0].producer() if add is not None and add.op_type == "Add" else None
        if mm is None or mm.op_type != "MatMul":
            return None
        weight, bias = mm.inputs[1], add.inputs[1]
        if weight.const_value is None or bias.const_value is None:
            return None
        projections.append({"x": mm.inputs[0], "W": weight, "b": bias, "y": add.outputs[0]})
    if len({id(p["x"]) for p in projections}) != 1 or node.inputs[1].shape[1] != heads:
        return None  # q, k, v from one input, as many kv heads as query heads
    uses = node.outputs[0].uses()
    t = uses[0].node if len(uses) == 1 else None
    if t is None or t.op_type != "Transpose" or list(t.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    r_uses = t.outputs[0].uses()
    r = r_uses[0].node if len(r_uses) == 1 else None
    if r is None or r.op_type != "Reshape":
        return None
    return {"heads": heads, "head_dim": head_dim, "projections": projections, "out": r.outputs[0],
            "scale": node.attributes.get_float("scale", None)}


def _scale_attribute(layer: dict) -> dict:
    return {} if layer["scale"] is None else {"scale": layer["scale"]}


def _standard_3d(graph: ir.Graph, node: ir.Node, layer: dict, packed: bool) -> ir.Value:
    heads, nodes = layer["heads"], []
    if packed:
        x = layer["projections"][0]["x"]
        weight = _initializer(graph, f"{node.name}.qkv.weight",
                              np.concatenate([p["W"].const_value.numpy() for p in layer["projections"]], axis=1))
        bias = _initializer(graph, f"{node.name}.qkv.bias",
                            np.concatenate([p["b"].const_value.numpy() for p in layer["projections"]]))
        mm = ir.node("MatMul", [x, weight], name=f"{node.name}_qkv_matmul")
        add = ir.node("Add", [mm.outputs[0], bias], name=f"{node.name}_qkv_add")
        split = ir.node("Split", [add.outputs[0]], attributes={"axis": -1, "num_outputs": 3}, num_outputs=3,
                        name=f"{node.name}_qkv_split")
        nodes += [mm, add, split]
        q, k, v = split.outputs
    else:
        q, k, v = (p["y"] for p in layer["projections"])
    attention = ir.node("Attention", [q, k, v, node.inputs[3]], name=f"{node.name}_3d",
                        attributes={"q_num_heads": heads, "kv_num_heads": heads, **_scale_attribute(layer)})
    graph.insert_before(node, [*nodes, attention])
    out = attention.outputs[0]
    out.shape, out.dtype = layer["out"].shape, layer["out"].dtype
    return out


def _decomposed(graph: ir.Graph, node: ir.Node, layer: dict) -> ir.Value:
    """softmax(q k^T * scale, masked) v on the traced (B, H, T, D) inputs; masked scores get float32's minimum, as
    the references do (a fully masked row averages v rather than producing NaN)."""
    q, k, v, mask = node.inputs[:4]
    scale = layer["scale"] if layer["scale"] is not None else 1.0 / float(np.sqrt(layer["head_dim"]))
    nodes = []

    def add(op, inputs, **attributes):
        nodes.append(ir.node(op, inputs, attributes=attributes, name=f"{node.name}_{op.lower()}_{len(nodes)}"))
        return nodes[-1].outputs[0]

    def constant(value):
        nodes.append(ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(value, np.float32))},
                             name=f"{node.name}_const_{len(nodes)}"))
        return nodes[-1].outputs[0]

    scores = add("Mul", [add("MatMul", [q, add("Transpose", [k], perm=[0, 1, 3, 2])]), constant(scale)])  # (B,H,T,S)
    scores = add("Where", [mask, scores, constant(np.finfo(np.float32).min)])
    out = add("MatMul", [add("Softmax", [scores], axis=-1), v])  # (B, H, T, D)
    graph.insert_before(node, nodes)
    out.shape, out.dtype = node.outputs[0].shape, node.outputs[0].dtype
    return out


def _contrib(graph: ir.Graph, node: ir.Node, layer: dict, mask: ir.Value) -> ir.Value:
    x = layer["projections"][0]["x"]
    weight = _initializer(graph, f"{node.name}.qkv.weight",
                          np.concatenate([p["W"].const_value.numpy() for p in layer["projections"]], axis=1))
    bias = _initializer(graph, f"{node.name}.qkv.bias",
                        np.concatenate([p["b"].const_value.numpy() for p in layer["projections"]]))
    attention = ir.node("Attention", [x, weight, bias, mask], domain="com.microsoft", name=f"{node.name}_contrib",
                        attributes={"num_heads": layer["heads"], **_scale_attribute(layer)})
    graph.insert_before(node, attention)
    out = attention.outputs[0]
    out.shape, out.dtype = layer["out"].shape, layer["out"].dtype
    return out


def _raw_mask(graph: ir.Graph, mask: ir.Value, cache: dict) -> ir.Value | None:
    """The int32 (B, S) padding mask behind a bool (B, 1, T, S) mask built as
    ``Expand(Cast(Unsqueeze(attention_mask, [1, 2])))``; None if the mask is anything else."""
    if mask in cache:
        return cache[mask]
    chain, value = [], mask
    while value is not None and value.producer() is not None and value.producer().op_type in ("Expand", "Cast"):
        chain.append(value.producer())
        value = value.producer().inputs[0]
    unsqueeze = value.producer() if value is not None else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or not unsqueeze.inputs[0].is_graph_input():
        cache[mask] = None
        return None
    axes = unsqueeze.inputs[1].const_value if len(unsqueeze.inputs) > 1 and unsqueeze.inputs[1] is not None else None
    if axes is None or sorted(axes.numpy().tolist()) != [1, 2]:
        cache[mask] = None
        return None
    cast = ir.node("Cast", [unsqueeze.inputs[0]], attributes={"to": ir.DataType.INT32}, name="kiln_mask_index")
    graph.insert_after(unsqueeze, cast)
    cast.outputs[0].name = "kiln_mask_index"
    cache[mask] = cast.outputs[0]
    return cache[mask]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(array.astype(np.float32), name=name))
    graph.register_initializer(value)
    return value
