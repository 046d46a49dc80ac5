"""For bench_peers.py, run with the Optimum virtualenv's python (.bench-venvs/optimum; never kiln's):

    .bench-venvs/optimum/bin/python benchmarks/peers/_optimum_worker.py '{"jobs": [{"checkpoint": ..., "out": ...}]}'

For each job, exports the checkpoint with Optimum three ways, each reused when its file is already there:

- ``OUT/plain/model.onnx``: ``ORTModelForFeatureExtraction.from_pretrained(checkpoint, export=True)``, saved;
- ``OUT/o2/model_optimized.onnx``: ``ORTOptimizer`` on the plain export with ``AutoOptimizationConfig.O2()``;
- ``OUT/int8/model_quantized.onnx``: ``ORTQuantizer`` on the plain export with
  ``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)`` (dynamic, per-channel int8 weights).

Prints one JSON line on stdout: the versions of this venv and, per job, the three ONNX paths.
Nothing is timed here: bench_peers.py runs these files in kiln's own onnxruntime.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path


def export_plain(checkpoint: str, out: Path) -> None:
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    ORTModelForFeatureExtraction.from_pretrained(checkpoint, export=True).save_pretrained(out)


def optimize_o2(plain: Path, out: Path) -> None:
    from optimum.onnxruntime import AutoOptimizationConfig, ORTOptimizer

    ORTOptimizer.from_pretrained(plain.parent).optimize(AutoOptimizationConfig.O2(), save_dir=out)


def quantize_int8(plain: Path, out: Path) -> None:
    from optimum.onnxruntime import AutoQuantizationConfig, ORTQuantizer

    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    ORTQuantizer.from_pretrained(plain.parent, file_name=plain.name).quantize(config, save_dir=out)


def once(target: Path, step, source) -> str:
    """Run ``step(source, directory)`` unless ``target`` exists; it writes into ``<directory>.partial``, renamed to
    the target's directory when done, so an interrupted export is never mistaken for a finished one."""
    if target.is_file():
        print(f"  optimum: reusing {target}", file=sys.stderr, flush=True)
        return str(target)
    partial = target.parent.with_name(target.parent.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target.parent, ignore_errors=True)
    started = time.perf_counter()
    step(source, partial)
    partial.rename(target.parent)
    print(f"  optimum: wrote {target} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return str(target)


def main() -> None:
    args = json.loads(sys.argv[1])
    protocol, sys.stdout = sys.stdout, sys.stderr  # library chatter goes to stderr; stdout carries one JSON line
    from importlib.metadata import version

    import transformers

    transformers.utils.logging.set_verbosity_error()
    jobs = []
    for job in args["jobs"]:
        out = Path(job["out"])
        plain = Path(once(out / "plain" / "model.onnx", export_plain, job["checkpoint"]))
        jobs.append({"plain": str(plain), "o2": once(out / "o2" / "model_optimized.onnx", optimize_o2, plain),
                     "int8": once(out / "int8" / "model_quantized.onnx", quantize_int8, plain)})
    names = ("optimum", "optimum-onnx", "transformers", "onnxruntime", "onnx", "torch")
    info = {"versions": {name: version(name) for name in names}, "python": sys.version.split()[0], "jobs": jobs}
    print(json.dumps(info), file=protocol, flush=True)


if __name__ == "__main__":
    main()
