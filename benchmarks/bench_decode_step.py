"""One decode step of several decoder graphs whose KV cache is a shared buffer, interleaved in one process.

For comparing graph forms with the same weights (kiln's in-place attention forms, onnxruntime-genai's model): each
graph gets a cache buffer of ``context + 64`` positions bound as both past and present (onnxruntime's IO binding, as
kiln's runtime and onnxruntime-genai bind them), a context of ``context`` filled positions (random values: the step's
cost does not depend on them) and one new token; blocks of 40 steps per graph, rounds interleaved (order reversed
every other round), 2 intra-op threads, spinning off; medians over rounds. A graph's session options are kiln's
(SkipLayerNormFusion off) unless its directory has a genai_config.json.

    .venv/bin/python benchmarks/bench_decode_step.py --contexts 32,1000,3000 A/model.onnx B/model.onnx ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def session(path: Path, context: int, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    genai = (path.parent / "genai_config.json").is_file()
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=[] if genai else ["SkipLayerNormFusion"])
    inputs = {i.name: i for i in sess.get_inputs()}
    binding, buffers = sess.io_binding(), []
    binding.bind_cpu_input("input_ids", np.array([[42]], np.int64))
    binding.bind_cpu_input("attention_mask", np.ones((1, context + 1), np.int64))
    if "position_ids" in inputs:
        binding.bind_cpu_input("position_ids", np.array([[context]], np.int64))
    rng = np.random.default_rng(0)
    for name, info in inputs.items():
        if name.startswith("past_key_values."):
            heads, dim = info.shape[1], info.shape[3]
            if not isinstance(dim, int):  # onnxruntime-genai names it (kv_cache_dim); its config says it
                dim = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
            buffer = ort.OrtValue.ortvalue_from_numpy(
                (rng.standard_normal((1, heads, context + 64, dim)) * 0.1).astype(np.float32))
            buffers.append(buffer)
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output("present." + name.removeprefix("past_key_values."), buffer)
    binding.bind_output("logits")
    return sess, binding, buffers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--contexts", default="32,1000,3000")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"| context | {' | '.join(g.parent.name for g in args.graphs)} |")
    print(f"|---:|{'---:|' * len(args.graphs)}")
    for context in (int(c) for c in args.contexts.split(",")):
        made = {g: session(g, context, args.threads) for g in args.graphs}
        times = {g: [] for g in args.graphs}
        for r in range(args.rounds):
            for g in (args.graphs if r % 2 == 0 else args.graphs[::-1]):
                sess, binding, _ = made[g]
                for _ in range(5):
                    sess.run_with_iobinding(binding)
                start = time.perf_counter()
                for _ in range(40):
                    sess.run_with_iobinding(binding)
                times[g].append((time.perf_counter() - start) / 40 * 1e3)
        print(f"| {context} | " + " | ".join(f"{statistics.median(times[g]):.2f}" for g in args.graphs) + " |",
              flush=True)
        del made


if __name__ == "__main__":
    main()
