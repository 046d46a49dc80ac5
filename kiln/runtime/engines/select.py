"""Which engine runs an artifact: a TensorRT plan from ``kiln build`` when one matches this machine, else onnxruntime.

``select_engine`` is the decision, pure (the machine's facts come in as arguments) so it is tested without a GPU;
``open_engine`` gathers the facts and opens what it chose, logging why when it falls back to onnxruntime.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.artifact import MANIFEST, artifact_file, load_manifest
from kiln.errors import InputError

log = logging.getLogger("kiln")
DEVICES = ("cpu", "cuda", "auto", "tensorrt")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(text).split(".") if part.isdigit())


def select_engine(engines: list[dict], *, tensorrt_version: str | None, compute_capability: str | None,
                  onnx_sha256: str | None, exists=lambda file: True, precision: str | None = None
                  ) -> tuple[dict | None, str]:
    """(the engine entry to run, "") or (None, why none fits). ``engines``: kiln.json's list; ``exists(file)`` says
    whether a plan file is present. Among several that fit, the one built last wins (``precision`` narrows first)."""
    if not engines:
        return None, "the artifact has no TensorRT engine (build one with `kiln build DIR`)"
    if tensorrt_version is None:
        from kiln.runtime.engines.tensorrt import TENSORRT_MISSING

        return None, TENSORRT_MISSING
    if compute_capability is None:
        return None, "no NVIDIA GPU is visible (CUDA found no device)"
    reasons = []
    for entry in reversed(engines):
        built = f"TensorRT {entry.get('tensorrt')} on compute capability {entry.get('compute_capability')}"
        if precision is not None and entry.get("precision") != precision:
            reasons.append(f"{entry.get('key')}: precision {entry.get('precision')}, not {precision}")
        elif entry.get("compute_capability") != compute_capability:
            reasons.append(f"{entry.get('key')}: built with {built}, this GPU is {compute_capability}")
        elif not _same_tensorrt(entry, tensorrt_version):
            reasons.append(f"{entry.get('key')}: built with {built}, TensorRT here is {tensorrt_version}")
        elif onnx_sha256 is not None and entry.get("onnx_sha256") != onnx_sha256:
            reasons.append(f"{entry.get('key')}: built from another model.onnx (the artifact was re-exported)")
        elif not exists(entry.get("file", "")):
            reasons.append(f"{entry.get('key')}: {entry.get('file')} is missing")
        else:
            return entry, ""
    return None, "no engine fits this machine: " + "; ".join(reasons)


def _same_tensorrt(entry: dict, installed: str) -> bool:
    """A plan runs on the TensorRT that built it; a version-compatible one also on later releases of that major."""
    built = entry.get("tensorrt", "")
    if entry.get("version_compatible"):
        return _version(installed)[:1] == _version(built)[:1] and _version(installed) >= _version(built)
    return _version(installed) == _version(built)


def open_engine(path, device: str = "cpu", threads: int | None = None, manifest: dict | None = None,
                spinning: bool = True):
    """``path``: the artifact directory or its model file. ``device``: ``cpu`` and ``cuda`` run onnxruntime (its CPU
    or CUDA provider); ``auto`` runs a matching TensorRT engine if there is one and TensorRT imports, else
    onnxruntime with CUDA if available, else CPU; ``tensorrt`` insists on TensorRT."""
    if device not in DEVICES:
        raise InputError(f"Unknown device {device!r}; use one of {', '.join(DEVICES)}.")
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if manifest is None and (directory / MANIFEST).is_file():
        manifest = load_manifest(directory)
    model = path if not path.is_dir() else artifact_file(directory, (manifest or {}).get("model", "model.onnx"))
    if device in ("auto", "tensorrt"):
        engine, why = _open_tensorrt(directory, manifest)
        if engine is not None:
            return engine
        if device == "tensorrt":
            raise InputError(f"device='tensorrt': cannot run {directory} with TensorRT: {why}.")
        log.info("device='auto': running on onnxruntime, not TensorRT: %s", why)
    from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine, providers_for

    if (manifest or {}).get("precision") == "bf16" and providers_for(device) == ["CPUExecutionProvider"]:
        raise InputError(f"{directory} is a bf16 artifact, which onnxruntime's CPU provider cannot run. Run it on a "
                         "GPU (device='cuda' with onnxruntime-gpu, or a TensorRT engine from `kiln build`), or "
                         "export fp32, fp16 or int8 for CPUs.")
    return OnnxRuntimeEngine(model, device=device, threads=threads, spinning=spinning, manifest=manifest)


def _open_tensorrt(directory: Path, manifest: dict | None):
    from kiln.runtime.engines import tensorrt

    if manifest is None:
        return None, f"{directory} has no {MANIFEST} to list engines"
    engines = manifest.get("engines") or []
    trt_version = tensorrt.tensorrt_version() if engines else None  # import TensorRT only when there is a plan
    cc = tensorrt.gpu_compute_capability() if trt_version else None
    entry, why = select_engine(engines, tensorrt_version=trt_version, compute_capability=cc,
                               onnx_sha256=(manifest.get("files") or {}).get(manifest.get("model")),
                               exists=lambda file: artifact_file(directory, file).is_file())
    if entry is None:
        return None, why
    io = {t["name"]: t["shape"] for t in (*manifest.get("inputs", []), *manifest.get("outputs", []))}
    engine = tensorrt.TensorRTEngine(artifact_file(directory, entry["file"]), io=io,
                                     jit_plugins=entry.get("plugin") == "jit",
                                     version_compatible=bool(entry.get("version_compatible")))
    log.info("running %s with TensorRT engine %s (%s)", directory, entry["file"], entry.get("precision"))
    return engine, ""
