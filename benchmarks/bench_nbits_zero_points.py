"""onnxruntime's 4-bit ``MatMulNBits`` with float zero points against uint8 ones, CPU: the measurement behind not
importing a GGUF's Q4_1 blocks as they are (benchmarks/RESULTS.md, "Decoder precisions").

A Q4_1 block of 32 weights is ``d * q + m`` with q in 0..15 and a float minimum m. MatMulNBits computes
``scale * (q - zero_point)``, so the blocks go over exactly only with a float zero point ``-m / d`` (uint8 zero points
round it: the error of any 4-bit requantization). This script checks that float zero points are exact and times 20
independent SmolLM2-sized projections (K=576, N=1536, block 32) per call with each kind of zero point, at
accuracy_level 4 (int8 activations, kiln's setting) and 0 (fp32), for one row (decode) and 32 rows (prefill).

    .venv/bin/python benchmarks/bench_nbits_zero_points.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, BLOCK, LAYERS = 576, 1536, 32, 20


def graph(float_zero_points: bool, level: int, rows: int, rng) -> ort.InferenceSession:
    nodes, weights = [], []
    blocks = K // BLOCK
    for i in range(LAYERS):
        q = rng.integers(0, 16, (N, blocks, BLOCK)).astype(np.uint8)
        scales = rng.uniform(0.01, 0.05, N * blocks).astype(np.float32)
        if float_zero_points:
            zero_points = rng.uniform(0, 15, N * blocks).astype(np.float32)
        else:  # two 4-bit zero points per byte, each row padded to whole bytes
            z = np.pad(rng.integers(0, 16, (N, blocks)).astype(np.uint8), ((0, 0), (0, blocks % 2)))
            zero_points = (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)
        weights += [numpy_helper.from_array((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), f"B{i}"),
                    numpy_helper.from_array(scales, f"s{i}"), numpy_helper.from_array(zero_points, f"z{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"B{i}", f"s{i}", f"z{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=level))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, K])],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, N]) for i in range(LAYERS)],
                          weights)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def exact_q4_1(rng) -> float:
    """Max |MatMulNBits(x) - x @ W.T| for W made of Q4_1 blocks, with float zero points -m/d."""
    d = rng.uniform(0.01, 0.05, (8, K // BLOCK)).astype(np.float32)
    m = rng.uniform(-0.4, -0.1, (8, K // BLOCK)).astype(np.float32)
    q = rng.integers(0, 16, (8, K // BLOCK, BLOCK)).astype(np.uint8)
    w = (d[..., None] * q + m[..., None]).reshape(8, K)
    node = helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["y"], domain="com.microsoft", K=K, N=8, bits=4,
                            block_size=BLOCK, accuracy_level=4)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                          [numpy_helper.from_array((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), "B"),
                           numpy_helper.from_array(d.reshape(-1), "s"), numpy_helper.from_array((-m / d).reshape(-1), "z")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((1, K)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float(np.abs(y - x @ w.T).max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"Q4_1 blocks through float zero points: max abs error {exact_q4_1(rng):.1e}")
    print("| rows | uint8 zp, level 4 | float zp, level 4 | uint8 zp, level 0 | float zp, level 0 |  (ms per MatMul)")
    for rows in (1, 32):
        sessions = {(f, level): graph(f, level, rows, rng) for level in (4, 0) for f in (False, True)}
        x = rng.standard_normal((rows, K)).astype(np.float32)
        times = {key: [] for key in sessions}
        for _ in range(args.rounds):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"x": x})
                times[key].append(time.perf_counter() - start)
        print(f"| {rows} | " + " | ".join(f"{np.median(times[key]) * 1000 / LAYERS:.3f}" for key in sessions) + " |")


if __name__ == "__main__":
    main()
