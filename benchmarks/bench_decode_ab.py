"""The decode loop of two kiln checkouts on one decoder artifact, in alternating processes: did a change to the
runtime change decode speed?

    .venv/bin/python benchmarks/bench_decode_ab.py ARTIFACT --a /path/to/old/checkout --b . [--pairs 6]

Each process loads the artifact's text-generation pipeline (2 threads), warms up, then generates 64 greedy tokens
after a 32-token prompt 5 times, timing the prefill (prompt -> first token) and each decode step (between tokens) with
the loop's own per-token callback; it prints the medians. The two checkouts run alternately (A, B, B, A, ...) so that
both see the same machine state; the summary gives the medians over processes and the ratio B/A.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np
import kiln
try:  # since the redesign: the loop is kiln.runtime.generate
    from kiln.runtime.generate import GenerationConfig, generate
except ImportError:  # before: kiln.runtime.decoding + kiln.runtime.generation
    from kiln.runtime.decoding import generate
    from kiln.runtime.generation import GenerationConfig
pipe = kiln.pipeline("text-generation", sys.argv[1], threads=2)
ids = (np.arange(32, dtype=np.int64)[None, :] * 37 + 100) % 1000
mask = np.ones_like(ids)
config = GenerationConfig(max_new_tokens=64)
prefill, decode = [], []
for run in range(6):
    stamps = [time.perf_counter()]
    generate(pipe.decoder, ids, mask, config, on_tokens=lambda t: stamps.append(time.perf_counter()))
    if run:  # the first is the warm-up
        prefill.append(stamps[1] - stamps[0])
        decode.extend(np.diff(stamps[1:]))
print(json.dumps({"prefill_ms": 1000 * float(np.median(prefill)), "decode_ms": 1000 * float(np.median(decode))}))
"""


def run(checkout: Path, artifact: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", CHILD, artifact], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--a", type=Path, required=True, help="the checkout to compare against (e.g. before a change)")
    parser.add_argument("--b", type=Path, default=Path("."), help="the checkout under test")
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    results = {"A": [], "B": []}
    for i in range(args.pairs):
        for name in ("AB" if i % 2 == 0 else "BA"):
            results[name].append(run(getattr(args, name.lower()).resolve(), args.artifact))
            time.sleep(0.5)
    summary = {name: {key: float(np.median([r[key] for r in rows])) for key in ("prefill_ms", "decode_ms")}
               for name, rows in results.items()}
    for key in ("prefill_ms", "decode_ms"):
        print(f"{key}: A {summary['A'][key]:.2f}  B {summary['B'][key]:.2f}  B/A {summary['B'][key] / summary['A'][key]:.3f}")
    print(json.dumps({"summary": summary, "runs": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
