"""Soak: 5,000 pipeline calls in one process, and resident memory settles after warm-up (issue 8, item 2).

The calls run in a fresh Python that imports the runtime only (as a service would, no torch), so its resident set
is small (~100 MB) and 5% of it is a sharp bound: a leak of 1 KB per call would show. Inputs cycle through single
texts and batches of several lengths, so every shape onnxruntime's arena will see is seen during warm-up.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CALLS, WARMUP, EVERY = 5000, 500, 500
MAX_GROWTH = 0.05

SCRIPT = r"""
import json, os, sys

def rss() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:  # resident pages, second field of /proc/self/statm
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

import kiln

artifact, calls, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = kiln.pipeline("feature-extraction", artifact, threads=1)
inputs = ["hello world", ["a", "the movie was great"], "paris is the capital city of france " * 3,
          ["kiln runs fast", "i love it", "what a terrible film"], "x " * 40, ["berlin", "london " * 10]]
samples = [(0, rss())]
for i in range(1, calls + 1):
    out = pipe(inputs[i % len(inputs)], pooling="mean", normalize=True)
    assert out, "empty result"
    if i % every == 0:
        samples.append((i, rss()))
print(json.dumps({"samples": samples, "torch": "torch" in sys.modules}))
"""


@pytest.mark.slow
def test_soak_resident_memory_settles(artifacts, record_property, capsys):
    artifact = artifacts("bert", "feature-extraction")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(artifact), str(CALLS), str(EVERY)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["torch"], "the runtime imported torch"
    samples = dict(result["samples"])
    warm, final = samples[WARMUP], samples[CALLS]
    growth = (final - warm) / warm
    series = ", ".join(f"{i}: {rss / 2**20:.1f}" for i, rss in result["samples"])
    line = (f"soak: {CALLS} calls, resident memory {warm / 2**20:.1f} MiB after {WARMUP} warm-up calls -> "
            f"{final / 2**20:.1f} MiB at the end ({growth:+.2%}; limit {MAX_GROWTH:.0%}); MiB by call: {series}")
    record_property("soak_calls", CALLS)
    record_property("soak_rss_growth", round(growth, 5))
    print(line)
    with capsys.disabled():
        print("\n" + line, end="")
    assert growth < MAX_GROWTH, line
