"""Weights that already are 4- or 8-bit blocks (a GGUF's Q4_0 / Q8_0 tensors) keep them (passes/exact_blocks.py):
MatMulNBits storing exactly the values the file stores, against numpy and against the gguf package's own quantizer;
anything else (float weights, Q4_1) left for the quantizer; and a GGUF checkpoint exported at int4 / int8 whose every
projection keeps the file's blocks."""

from __future__ import annotations

import gguf
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kiln.exporter.passes.exact_blocks import ExactBlocks, exact_blocks

Q4_0, Q8_0, Q4_1 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1


def as_shipped(k: int, n: int, qtype, seed: int = 0) -> np.ndarray:
    """A (K, N) MatMul weight whose rows (N, K as the checkpoint stores them) went through ``qtype`` and back, as
    kiln's GGUF import gives it."""
    rows = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return np.ascontiguousarray(gguf.quants.dequantize(gguf.quants.quantize(rows, qtype), qtype).astype(np.float32).T)


def matmul_nbits(weight_k: int, weight_n: int, blocks, scales, bits: int, accuracy_level: int = 0):
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=weight_k, N=weight_n,
                            bits=bits, block_size=32, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight_k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight_n])],
                              [helper.make_tensor("B", TensorProto.UINT8, blocks.shape, blocks.tobytes(), raw=True),
                               helper.make_tensor("scales", TensorProto.FLOAT, scales.shape, scales.tobytes(),
                                                  raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("qtype, bits", [(Q4_0, 4), (Q8_0, 8)])
def test_blocks_store_exactly_the_files_values(qtype, bits):
    weight = as_shipped(96, 40, qtype)
    found = exact_blocks(weight, bits)
    assert found is not None
    blocks, scales = found
    assert blocks.shape == (40, 3, 32 * bits // 8) and blocks.dtype == np.uint8 and scales.shape == (40 * 3,)
    # Unpacked with MatMulNBits' default zero point (8 or 128), the blocks are the weight, bit for bit.
    stored = blocks.astype(np.int16)
    if bits == 4:
        stored = np.stack([stored & 15, stored >> 4], -1).reshape(40, 3, 32)
    values = (stored - (1 << (bits - 1))) * scales.reshape(40, 3, 1)
    np.testing.assert_array_equal(values.reshape(40, 96).T.astype(np.float32), weight)
    # ... and onnxruntime's kernel multiplies by them (accuracy_level 0: activations stay float).
    x = np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)
    got = matmul_nbits(96, 40, blocks, scales, bits).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ weight, rtol=1e-5, atol=1e-5)


def test_other_weights_are_left_to_the_quantizer():
    rng = np.random.default_rng(0)
    assert exact_blocks(rng.standard_normal((64, 8)).astype(np.float32), 4) is None  # float weights
    assert exact_blocks(as_shipped(64, 8, Q4_1), 4) is None  # a block minimum beside the scale: not exact
    assert exact_blocks(as_shipped(64, 8, Q8_0), 4) is None  # 8-bit blocks do not fit 4 bits
    assert exact_blocks(as_shipped(64, 8, Q4_0)[:48], 4) is None  # K not whole blocks
    zeros = np.zeros((32, 4), np.float32)  # a block of zeros: scale 0
    assert exact_blocks(zeros, 4) is not None


def test_pass_rewrites_exact_weights_once_and_leaves_the_rest():
    q4, q8 = as_shipped(64, 16, Q4_0), as_shipped(64, 16, Q8_0, seed=5)
    floats = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 64]))
    shared = ir.Value(name="w", const_value=ir.tensor(q4, name="w"), shape=ir.Shape([64, 16]),
                      type=ir.TensorType(ir.DataType.FLOAT))
    other = ir.Value(name="f", const_value=ir.tensor(floats, name="f"), shape=ir.Shape([64, 16]),
                     type=ir.TensorType(ir.DataType.FLOAT))
    eight = ir.Value(name="e", const_value=ir.tensor(q8, name="e"), shape=ir.Shape([64, 16]),
                     type=ir.TensorType(ir.DataType.FLOAT))
    nodes = [ir.node("MatMul", [x, shared], name="a"), ir.node("MatMul", [x, shared], name="b"),
             ir.node("MatMul", [x, other], name="c"), ir.node("MatMul", [x, eight], name="d")]
    graph = ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes, initializers=[shared, other, eight],
                     opset_imports={"": 21})
    for node in nodes:
        node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([2, 16])
    model = ir.Model(graph, ir_version=10)
    result = ExactBlocks()(model)  # 4 bits where they fit, else 8
    assert result.rewritten == 3 and sum(result.skipped.values()) == 1
    assert result.details == {"4-bit": 1, "8-bit": 1}  # the shared weight stored once
    assert [n.op_type for n in model.graph] == ["MatMulNBits", "MatMulNBits", "MatMul", "MatMulNBits"]
    assert [n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits"] == [4, 4, 8]
    assert "w" not in model.graph.initializers and "f" in model.graph.initializers
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feed = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    a, b, c, d = session.run(None, {"x": feed})
    np.testing.assert_allclose(a, feed @ q4, rtol=0, atol=0.01 * np.abs(feed @ q4).max())  # int8 activations
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(c, feed @ floats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d, feed @ q8, rtol=0, atol=0.01 * np.abs(feed @ q8).max())


@pytest.mark.parametrize("qtype, precision, kept", [(Q4_0, "int4", "4-bit"), (Q8_0, "int8", "8-bit"),
                                                    (Q8_0, "int4", "8-bit")])
def test_a_gguf_checkpoint_keeps_its_blocks(tmp_path, qtype, precision, kept):
    """Every projection and the tied head of a Q4_0 / Q8_0 file keeps the file's blocks (a Q8_0 file's at int4 too:
    never a second, coarser quantization), so the artifact computes with the weights the fp32 artifact (the file
    dequantized) holds: the same greedy tokens."""
    import kiln
    from kiln.runtime.generate import GenerationConfig, generate
    from test_gguf import byte_level_vocab, tiny_llama, write_gguf

    tokens, merges = byte_level_vocab()
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama(len(tokens), tie=True, seed=2), qtype=qtype, tokens=tokens,
                      merges=merges)
    manifest = kiln.export(str(path), tmp_path / precision, task="text-generation", precision=precision,
                           force_precision=True, batch="1:2", seq="1:64")
    assert manifest["accuracy"]["exact_block_weights"] == {kept: 2 * 4 + 1}  # qkv, o, gate|up, down a layer; head
    kiln.export(str(path), tmp_path / "fp32", task="text-generation", batch="1:2", seq="1:64")
    config = GenerationConfig(max_new_tokens=16, eos_token_id=None)
    ids = np.array([[5, 17, 42, 8, 99, 3, 250]])
    want = generate(kiln.pipeline("text-generation", tmp_path / "fp32").decoder, ids, np.ones_like(ids), config)
    got = generate(kiln.pipeline("text-generation", tmp_path / precision).decoder, ids, np.ones_like(ids), config)
    assert (got == want).mean() >= 0.9, (got, want)  # only the int8 activations of accuracy_level 4 differ
