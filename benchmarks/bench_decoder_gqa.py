"""Decoder attention as onnxruntime's com.microsoft.GroupQueryAttention instead of kiln's standard ``Attention``: the
measurement behind keeping the standard op (benchmarks/RESULTS.md, "Decoder attention").

A kiln decoder artifact (onnxruntime form: packed q/k/v MatMul + Split, two RotaryEmbedding nodes and one 3-D
``Attention`` per layer) is rewritten so that each layer's packed q/k/v output goes straight into one
GroupQueryAttention node that applies the rotary embedding itself (``do_rotary``, cos/sin tables of
``max_position_embeddings`` rows, ``position_ids``), appends to the cache and attends; ``seqlens_k`` and
``total_sequence_length`` say every row uses the whole cache. Two variants:

- ``gqa+bias``: the padding mask as an additive ``attention_bias`` (B, 1, S, T), which kiln's left-padded batches need;
- ``gqa``: no mask at all, which is right only for batches without padding.

Each is checked against the artifact's own graph (prefill + decode steps, unpadded batch 1 and a left-padded batch 2),
then the three graphs are timed interleaved: decode steps at batch 1 after a 64-token prompt, and a 32-token prefill.
Only the default rotary type (``rope_theta``, no scaling) is handled: this is a measurement, not an export pass. It
needs an artifact whose cache is concatenated (kiln.json ``attention.cache: concat``): since the in-place cache became
the default, make one with ``bench_long_context.prepare(workdir, precision, "concat")``.

    .venv/bin/python benchmarks/bench_decoder_gqa.py /tmp/dec/kiln-int4 [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort


def rewrite(src: Path, dst: Path, config: dict, bias: bool) -> int:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"rotary type {rope.get('rope_type')!r}: only the default one is handled here")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    model = ir.load(str(src))
    graph = model.graph
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.arange(config["max_position_embeddings"])[:, None] * inv[None]

    def constant(name, array):
        array = np.asarray(array)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        return value

    cos, sin = constant("gqa_cos", np.cos(freqs).astype(np.float32)), constant("gqa_sin", np.sin(freqs).astype(np.float32))
    inputs = {v.name: v for v in graph.inputs}
    mask, positions = inputs["attention_mask"], inputs["position_ids"]
    nodes = []

    def add(op, args, **attributes):
        nodes.append(ir.node(op, args, attributes=attributes, name=f"gqa_{op}_{len(nodes)}"))
        return nodes[-1].outputs[0]

    mask_shape = add("Shape", [mask])
    batch = add("Slice", [mask_shape, constant("gqa_0", [0]), constant("gqa_1", [1])])
    total = add("Cast", [add("Slice", [mask_shape, constant("gqa_1b", [1]), constant("gqa_2", [2])])], to=ir.DataType.INT32)
    total_scalar = add("Squeeze", [total])
    seqlens_k = add("Expand", [add("Sub", [total, constant("gqa_one", np.array([1], np.int32))]), batch])
    attention_bias = None
    if bias:
        keep = add("Cast", [add("Unsqueeze", [mask, constant("gqa_axes", [1, 2])])], to=ir.DataType.BOOL)
        rows = add("Slice", [add("Shape", [inputs["input_ids"]]), constant("gqa_1c", [1]), constant("gqa_2c", [2])])
        shape = add("Concat", [batch, constant("gqa_1d", [1]), rows, add("Cast", [total], to=ir.DataType.INT64)], axis=0)
        attention_bias = add("Expand", [add("Where", [keep, constant("gqa_zero", np.float32(0)),
                                                      constant("gqa_min", np.finfo(np.float32).min)]), shape])
    layers = [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    graph.insert_before(layers[0], nodes)
    for node in layers:
        split = node.inputs[2].producer()
        if split is None or split.op_type != "Split" or node.inputs[0].producer().op_type != "RotaryEmbedding":
            raise SystemExit("not a packed, rotary, 3-D decoder graph: export it with kiln's default passes")
        gqa = ir.node("GroupQueryAttention",
                      [split.inputs[0], None, None, node.inputs[4], node.inputs[5], seqlens_k, total_scalar, cos, sin,
                       positions, attention_bias],
                      domain="com.microsoft", name=f"{node.name}_gqa", num_outputs=3,
                      attributes={"num_heads": node.attributes.get_int("q_num_heads"),
                                  "kv_num_heads": node.attributes.get_int("kv_num_heads"),
                                  "scale": node.attributes.get_float("scale"), "do_rotary": 1, "rotary_interleaved": 0})
        graph.insert_before(node, gqa)
        for old, new in zip(node.outputs[:3], gqa.outputs):
            new.shape, new.dtype = old.shape, old.dtype
            name = old.name
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            old.name, new.name = f"{name}_replaced", name
    model.opset_imports["com.microsoft"] = 1
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    ir.save(model, str(dst), external_data=f"{dst.name}.data")
    return len(layers)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 2, 1, 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Runner:
    def __init__(self, path: Path):
        self.session = session(path)
        names = [i.name for i in self.session.get_inputs()]
        self.layers = sum(n.endswith(".key") for n in names)
        shape = next(i.shape for i in self.session.get_inputs() if i.name.endswith(".key"))
        self.kv_heads, self.head_dim = shape[1], shape[3]

    def empty(self, batch: int) -> list:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)] * (2 * self.layers)

    def __call__(self, ids, mask, positions, past):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for layer in range(self.layers):
            feed[f"past_key_values.{layer}.key"], feed[f"past_key_values.{layer}.value"] = past[2 * layer: 2 * layer + 2]
        out = self.session.run(None, feed)
        return out[0], out[1:]


def check(reference: Runner, other: Runner, batch: int, lead: int, steps: int = 3) -> dict:
    """Max abs logit difference on valid rows for the prefill and the worst of ``steps`` greedy decode steps, the
    last row left-padded by ``lead`` tokens."""
    ids = np.random.default_rng(0).integers(100, 20000, (batch, 12))
    mask = np.ones(ids.shape, np.int64)
    mask[-1, :lead] = 0
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    a, pa = reference(ids, mask, positions, reference.empty(batch))
    b, pb = other(ids, mask, positions, other.empty(batch))
    valid = mask.astype(bool)
    result = {"prefill": float(np.abs(a[valid] - b[valid]).max()), "decode": 0.0}
    for _ in range(steps):
        token = a[:, -1].argmax(-1)[:, None]
        mask, positions = np.concatenate([mask, np.ones((batch, 1), np.int64)], 1), positions[:, -1:] + 1
        a, pa = reference(token, mask, positions, pa)
        b, pb = other(token, mask, positions, pb)
        result["decode"] = max(result["decode"], float(np.abs(a - b).max()))
    return result


def decode_ms(runner: Runner, steps: int = 32, prompt: int = 64) -> float:
    ids = np.random.default_rng(1).integers(100, 20000, (1, prompt))
    logits, past = runner(ids, np.ones((1, prompt), np.int64), np.arange(prompt)[None], runner.empty(1))
    times = []
    for i in range(steps):
        token = logits[:, -1].argmax(-1)[:, None]
        start = time.perf_counter()
        logits, past = runner(token, np.ones((1, prompt + i + 1), np.int64), np.array([[prompt + i]]), past)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def prefill_ms(runner: Runner, tokens: int = 32, calls: int = 5) -> float:
    ids = np.random.default_rng(2).integers(100, 20000, (1, tokens))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        runner(ids, np.ones((1, tokens), np.int64), np.arange(tokens)[None], runner.empty(1))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, help="a kiln text-generation artifact (default export passes)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="where the rewritten graphs go (default: artifact)")
    args = parser.parse_args(argv)
    manifest = json.loads((args.artifact / "kiln.json").read_text())
    config = json.loads((args.artifact / "config.json").read_text())
    workdir = args.workdir or args.artifact
    graphs = {"kiln (standard Attention)": args.artifact / manifest["model"]}
    for name, bias in (("gqa+bias", True), ("gqa", False)):
        graphs[name] = workdir / f"model.{name.replace('+', '-')}.onnx"
        if not graphs[name].is_file():
            print(f"{name}: {rewrite(graphs['kiln (standard Attention)'], graphs[name], config, bias)} layers rewritten")
    runners = {name: Runner(path) for name, path in graphs.items()}
    reference = runners["kiln (standard Attention)"]
    for name, runner in list(runners.items())[1:]:
        print(f"{name}: max |logit diff| vs kiln, batch 1 unpadded {check(reference, runner, 1, 0)}, "
              f"batch 2 with 5 left pads {check(reference, runner, 2, 5)}")
    decode, prefill = {n: [] for n in runners}, {n: [] for n in runners}
    for round_ in range(args.rounds):
        for name, runner in (list(runners.items()) if round_ % 2 == 0 else list(runners.items())[::-1]):
            decode[name].append(decode_ms(runner))
            prefill[name].append(prefill_ms(runner))
    base = np.median(decode["kiln (standard Attention)"]), np.median(prefill["kiln (standard Attention)"])
    print(f"\n{manifest.get('precision', 'fp32')}, batch 1, {args.rounds} interleaved rounds, medians:")
    print("| graph | decode ms/token | vs kiln | prefill 32 ms | vs kiln |\n|---|---:|---:|---:|---:|")
    for name in runners:
        d, p = np.median(decode[name]), np.median(prefill[name])
        print(f"| {name} | {d:.2f} | {d / base[0]:.3f}x | {p:.1f} | {p / base[1]:.3f}x |")


if __name__ == "__main__":
    main()
