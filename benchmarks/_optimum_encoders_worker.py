"""For bench_new_encoders.py, run with the Optimum virtualenv's python (.bench-venvs/optimum; never kiln's):

    .bench-venvs/optimum/bin/python benchmarks/_optimum_encoders_worker.py '{"jobs": [{"checkpoint": ..., "out": ...,
        "task": ..., "towers": {"text": {"inputs": [...], "output": ...}, ...}}]}'

For each job, exports the checkpoint with Optimum, each step reused when its file is already there:

- ``OUT/fp32/model.onnx``: ``optimum.exporters.onnx.main_export(checkpoint, task=TASK)`` (Optimum's validation off:
  bench_new_encoders.py compares every runner's outputs with transformers itself);
- ``OUT/int8/model_quantized.onnx``: ``ORTQuantizer`` on it with
  ``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)`` (dynamic, per-channel int8 weights);
- with ``towers`` (CLIP, SigLIP: Optimum exports one graph taking text and images together, returning both towers'
  embeddings and the logits between them): ``OUT/{fp32,int8}/<tower>.onnx``, the part of that graph between the
  tower's inputs and its output, cut out with ``onnx.utils.extract_model`` (Optimum's own nodes, none changed), so
  that a text (or image) shape runs one tower, as kiln's separate graphs do.

A step that fails is recorded as ``"errors": {step: "ExceptionType: message"}`` with its path ``null``, the steps that
depend on it skipped; the worker goes on with the next job. Prints one JSON line on stdout: the versions of this
venv and, per job, the paths and errors. Nothing is timed here: bench_new_encoders.py runs these files in kiln's own
onnxruntime.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path


def export_fp32(checkpoint: str, task: str, out: Path) -> None:
    from optimum.exporters.onnx import main_export

    main_export(model_name_or_path=checkpoint, output=out, task=task, do_validation=False, device="cpu")


def quantize_int8(fp32: Path, out: Path) -> None:
    from optimum.onnxruntime import AutoQuantizationConfig, ORTQuantizer

    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    ORTQuantizer.from_pretrained(fp32.parent, file_name=fp32.name).quantize(config, save_dir=out)


def extract_tower(combined: Path, target: Path, inputs: list[str], output: str) -> None:
    """The sub-graph of ``combined`` from ``inputs`` (those it has) to ``output``, written to ``target``."""
    import onnx
    import onnx.utils

    model = onnx.load(str(combined), load_external_data=False)
    have = {i.name for i in model.graph.input}
    names = [name for name in inputs if name in have]
    if output not in {o.name for o in model.graph.output}:
        raise ValueError(f"{combined.name} has no output {output!r}")
    onnx.utils.extract_model(str(combined), str(target), names, [output], check_model=False)


def once(target: Path, step, *args) -> str:
    """Run ``step(*args, directory)`` unless ``target`` exists; it writes into ``<directory>.partial``, renamed to the
    target's directory when done, so an interrupted export is never mistaken for a finished one."""
    if target.is_file():
        print(f"  optimum: reusing {target}", file=sys.stderr, flush=True)
        return str(target)
    partial = target.parent.with_name(target.parent.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target.parent, ignore_errors=True)
    started = time.perf_counter()
    step(*args, partial)
    if not (partial / target.name).is_file():
        wrote = sorted(p.name for p in partial.iterdir())
        raise FileNotFoundError(f"the step wrote no {target.name} (it wrote {wrote})")
    partial.rename(target.parent)
    print(f"  optimum: wrote {target} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return str(target)


def tower_file(combined: Path, name: str, spec: dict) -> str:
    target = combined.with_name(f"{name}.onnx")
    if not target.is_file():
        started = time.perf_counter()
        partial = target.with_name(target.name + ".partial")
        extract_tower(combined, partial, spec["inputs"], spec["output"])
        partial.rename(target)
        print(f"  optimum: cut {target} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return str(target)


def error(err: BaseException) -> str:
    traceback.print_exception(err, file=sys.stderr)
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def run_job(job: dict) -> dict:
    out, towers = Path(job["out"]), job.get("towers") or {}
    result, errors = {"fp32": None, "int8": None, "towers": {}}, {}
    print(f"[optimum] {job['checkpoint']} ({job['task']})", file=sys.stderr, flush=True)
    try:
        result["fp32"] = once(out / "fp32" / "model.onnx", export_fp32, job["checkpoint"], job["task"])
    except Exception as err:  # noqa: BLE001 - recorded in the report instead of failing the benchmark
        errors["fp32"] = error(err)
    if result["fp32"]:
        try:
            result["int8"] = once(out / "int8" / "model_quantized.onnx", quantize_int8, Path(result["fp32"]))
        except Exception as err:  # noqa: BLE001
            errors["int8"] = error(err)
    for precision in ("fp32", "int8"):
        for name, spec in towers.items():
            if result[precision]:
                try:
                    result["towers"].setdefault(precision, {})[name] = tower_file(Path(result[precision]), name, spec)
                except Exception as err:  # noqa: BLE001
                    errors[f"{precision} {name} tower"] = error(err)
    result["errors"] = errors
    return result


def main() -> None:
    args = json.loads(sys.argv[1])
    protocol, sys.stdout = sys.stdout, sys.stderr  # library chatter goes to stderr; stdout carries one JSON line
    from importlib.metadata import version

    import transformers

    transformers.utils.logging.set_verbosity_error()
    jobs = [run_job(job) for job in args["jobs"]]
    names = ("optimum", "optimum-onnx", "transformers", "onnxruntime", "onnx", "torch")
    info = {"versions": {name: version(name) for name in names}, "python": sys.version.split()[0], "jobs": jobs}
    print(json.dumps(info), file=protocol, flush=True)


if __name__ == "__main__":
    main()
