"""TensorRT engines from kiln artifacts, built on Polygraphy's loaders; ``kiln build`` runs :func:`build`.

Every decision that needs no GPU is a pure function here, tested without TensorRT: :func:`profiles` (optimization
profiles from the artifact's named dynamic axes and a request such as ``batch=1:8:32,seq=1:128:512``),
:func:`cache_key`, :func:`precision_plan` and :func:`engine_path`. :func:`build` lowers the graph for TensorRT
(``passes/lower_attention.py``), parses it, builds, stores ``engines/<key>.plan`` atomically and records it in
kiln.json; a plan whose key matches is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kiln import hub
from kiln.artifact import artifact_file, load_manifest, weights_file
from kiln.errors import ExportError, InputError
from kiln.files import sha256_file

log = logging.getLogger("kiln")
PRECISIONS = ("fp32", "fp16", "bf16")
AXIS_ALIASES = {"seq": "sequence", "past": "past_sequence"}
# Decoders: attention_mask spans past + new tokens; its axis is derived, never requested.
DERIVED_AXES = {"total_sequence": ("past_sequence", "sequence")}
DEFAULT_OPT = {"batch": 1, "sequence": 128, "past_sequence": 128}  # TensorRT tunes kernels for the opt shape
LOWERING = "kiln-trt-1"  # part of the engine key: bump it when lower_for_tensorrt emits something else


def parse_profile(text: str | None) -> dict[str, tuple]:
    """``"batch=1:8:32,seq=1:128:512"`` -> {"batch": (1, 8, 32), "seq": (1, 128, 512)}; ``MIN:MAX`` leaves opt None,
    ``N`` fixes the axis."""
    ranges = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        try:
            numbers = [int(v) for v in value.split(":")]
        except ValueError:
            numbers = []
        if not name or len(numbers) not in (1, 2, 3):
            raise InputError(f"--profile {part!r}: write AXIS=MIN:OPT:MAX, AXIS=MIN:MAX or AXIS=N with integers, "
                             "axes separated by commas (e.g. batch=1:8:32,seq=1:128:512).")
        shapes = {1: (numbers[0],) * 3, 2: (numbers[0], None, numbers[-1]), 3: tuple(numbers)}
        ranges[name.strip()] = shapes[len(numbers)]
    return ranges


def axis_ranges(manifest: dict, requested: str | dict | None = None) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per named axis, inside the ranges the artifact was exported for; derived axes included."""
    declared = manifest.get("dynamic_axes") or {}
    asked = parse_profile(requested) if requested is None or isinstance(requested, str) else dict(requested)
    asked = {AXIS_ALIASES.get(name, name): value for name, value in asked.items()}
    for name in asked:
        if name in DERIVED_AXES:
            a, b = DERIVED_AXES[name]
            raise InputError(f"--profile {name}: it is {a} + {b}, derived from those; set them instead.")
        if name not in declared:
            raise InputError(f"--profile {name}: the artifact has no dynamic axis {name!r}; its axes are "
                             f"{', '.join(sorted(declared)) or 'none'} (seq = sequence, past = past_sequence).")
    ranges = {}
    for name, bounds in declared.items():
        low, high = bounds["min"], bounds["max"]
        mn, opt, mx = asked.get(name, (None, None, None))
        mn, mx = low if mn is None else mn, high if mx is None else mx
        opt = min(max(DEFAULT_OPT.get(name, mn), mn), mx) if opt is None else opt
        if not mn <= opt <= mx:
            raise InputError(f"--profile {name}={mn}:{opt}:{mx}: need MIN <= OPT <= MAX.")
        if mn < low or mx > high:
            raise InputError(f"--profile {name}={mn}:{opt}:{mx} leaves the range the artifact was exported for "
                             f"({low}..{high}); re-export with a wider range or ask for less.")
        ranges[name] = (mn, opt, mx)
    for name, (a, b) in DERIVED_AXES.items():
        if a in ranges and b in ranges:
            # past + new tokens never exceed the context the decoder was exported for (past max + 1).
            context = declared[a]["max"] + 1
            mn, mx = ranges[a][0] + ranges[b][0], min(ranges[a][2] + ranges[b][2], context)
            if mn > mx:
                raise InputError(f"--profile: {a} min + {b} min = {mn} exceeds the context of {context} tokens.")
            ranges[name] = (mn, min(ranges[a][1] + ranges[b][1], mx), mx)
    return ranges


def profiles(manifest: dict, requested: str | dict | None = None) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Input name -> (min shape, opt shape, max shape): one TensorRT optimization profile for the artifact."""
    ranges = axis_ranges(manifest, requested)
    shapes = {}
    for tensor in manifest["inputs"]:
        dims = []
        for axis in tensor["shape"]:
            if isinstance(axis, int):
                dims.append((axis, axis, axis))
            elif axis in ranges:
                dims.append(ranges[axis])
            else:
                raise InputError(f"input {tensor['name']!r} has axis {axis!r}, for which kiln.json records no range. "
                                 "Re-export the artifact.")
        shapes[tensor["name"]] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return shapes


def cache_key(onnx_sha256: str, trt_version: str, compute_capability: str, profiles: dict, precision: str, *,
              version_compatible: bool = False) -> str:
    """The engine's identity: a plan is reused only if all of these match."""
    payload = {"onnx": onnx_sha256, "tensorrt": str(trt_version), "compute_capability": str(compute_capability),
               "profiles": {name: [list(s) for s in shapes] for name, shapes in sorted(profiles.items())},
               "precision": precision, "version_compatible": bool(version_compatible), "lowering": LOWERING}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str  # fp32 | fp16 | bf16
    dtype: str  # numpy name of the compute type
    graph_pass: bool  # whether kiln.exporter.passes.half writes the types into the graph before the build
    keep_fp32_ops: tuple[str, ...]  # ONNX op types that stay fp32


def precision_plan(precision: str, artifact_precision: str = "fp32") -> PrecisionPlan:
    """Every engine is built from a strongly typed network (the only kind TensorRT 11 accepts; TensorRT 10 takes it
    too): the ONNX types are the engine's types. fp32: the graph as exported, TF32 off. fp16/bf16: the graph pass
    ``passes/half.py`` types matrix products and elementwise ops in 16 bits and keeps normalizations, softmax and
    reductions fp32 (:data:`kiln.exporter.passes.half.FP32_OPS`). An artifact exported at fp16/bf16 already carries
    its types and builds at that precision only; int8/int4 artifacts are onnxruntime CPU graphs."""
    from kiln.exporter.passes.half import FP32_OPS

    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if artifact_precision in ("int8", "int4"):
        raise InputError(f"This artifact was exported at {artifact_precision} (onnxruntime's dynamic quantization "
                         "for CPUs), which TensorRT does not build. Export it at fp32 and build with --precision "
                         "fp16 or bf16.")
    if artifact_precision in ("fp16", "bf16") and precision != artifact_precision:
        raise InputError(f"This artifact was exported at {artifact_precision}; build it with --precision "
                         f"{artifact_precision}, or export at fp32 to build other precisions.")
    if precision == "fp32":
        return PrecisionPlan("fp32", "float32", False, ())
    return PrecisionPlan(precision, {"fp16": "float16", "bf16": "bfloat16"}[precision],
                         artifact_precision == "fp32", tuple(sorted(FP32_OPS)))


def engine_path(artifact, key: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{8,64}", key):
        raise ValueError(f"engine key {key!r} is not a hex digest")
    return Path(artifact) / "engines" / f"{key}.plan"


def build(artifact, precision: str = "fp32", profile: str | dict | None = None, timing_cache=None,
          version_compatible: bool = False, *, force: bool = False) -> dict:
    """Build (or reuse) the TensorRT engine of ``artifact`` for this GPU; returns its kiln.json entry."""
    from kiln.kernels.attention.trt_plugin import supports_aot
    from kiln.runtime.engines.tensorrt import gpu_compute_capability, import_tensorrt

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    if manifest.get("encoder"):
        raise InputError(f"{artifact} is an encoder-decoder artifact ({manifest['task']}); kiln build makes TensorRT "
                         "engines for one-graph artifacts only so far. Run it with onnxruntime (--device cuda).")
    plan, shapes = precision_plan(precision, manifest.get("precision") or "fp32"), profiles(manifest, profile)
    trt, _ = import_tensorrt("Building a TensorRT engine")
    cc = gpu_compute_capability()
    if cc is None:
        raise ExportError("Building a TensorRT engine needs an NVIDIA GPU, and CUDA found none on this machine.")
    model = artifact_file(artifact, manifest["model"])
    onnx_sha = (manifest.get("files") or {}).get(manifest["model"]) or sha256_file(model)
    key = cache_key(onnx_sha, trt.__version__, cc, shapes, precision, version_compatible=version_compatible)
    path = engine_path(artifact, key)
    existing = next((e for e in manifest.get("engines") or [] if e.get("key") == key), None)
    if existing and path.is_file() and not force:
        log.info("Reusing TensorRT engine %s (same graph, TensorRT, GPU, profile and precision)", path.name)
        return existing
    started = time.perf_counter()
    path.parent.mkdir(exist_ok=True)
    aot = True if supports_aot(trt.__version__) else None  # before 10.9 the node must not carry `aot` at all
    with tempfile.TemporaryDirectory(prefix=".build-", dir=path.parent) as tmp:
        lowered, counts = _lower(artifact, manifest, Path(tmp), trt.__version__, aot, plan)
        data = _engine_bytes(trt, lowered, plan, shapes, timing_cache, version_compatible, counts["plugin"] > 0)
        staged = Path(tmp) / "engine.plan"
        staged.write_bytes(data)
        os.replace(staged, path)  # same directory tree: readers see the whole plan or none
    entry = {"key": key, "file": path.relative_to(artifact).as_posix(), "sha256": sha256_file(path),
             "precision": precision, "profiles": {n: [list(s) for s in v] for n, v in shapes.items()},
             "axes": {n: list(r) for n, r in axis_ranges(manifest, profile).items()},
             "tensorrt": trt.__version__, "compute_capability": cc, "onnx_sha256": onnx_sha,
             "version_compatible": bool(version_compatible),
             "plugin": ("aot" if aot else "jit") if counts["plugin"] else None, "attention": counts,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "seconds": round(time.perf_counter() - started, 1)}
    _record(artifact, entry)
    log.info("TensorRT engine written to %s in %.0fs", path, entry["seconds"])
    return entry


def _lower(artifact: Path, manifest: dict, tmp: Path, version: str, aot: bool | None, plan: PrecisionPlan | None = None):
    """The artifact's graph after ``kiln.exporter.plan.tensorrt_passes`` (attention lowered for TensorRT, then fp16/bf16
    typed into the graph); returns (path, counts)."""
    import onnx_ir as ir

    from kiln.exporter import passes
    from kiln.exporter.plan import tensorrt_passes
    from kiln.kernels.attention.trt_plugin import DOMAIN, PLUGIN_NAME, supports_plugin, tensorrt_version

    attention = manifest.get("attention") or {}
    half = plan.precision if plan is not None and plan.graph_pass else None
    steps = tensorrt_passes(attention.get("form", "onnx"), half, cache=attention.get("cache", "concat"))
    source = artifact_file(artifact, manifest["model"])
    model = ir.load(str(source))
    results = passes.run(model, steps, aot=aot, sliding_window=_sliding_window(artifact),
                         extra_half_ops={(DOMAIN, PLUGIN_NAME)})
    counts = dict(results["lower-attention"].details)
    if counts["skipped"]:
        raise ExportError(f"{counts['skipped']} decoder attention node(s) could not be lowered for TensorRT (see the "
                          "warnings above): TensorRT's ONNX Attention cannot return a KV cache.")
    if counts["plugin"] and not supports_plugin(version):
        raise ExportError(f"TensorRT {version} has no Python plugins; decoders need TensorRT >= 10.6.")
    if counts["kept"] and tensorrt_version(version) < (10, 14):
        raise ExportError(f"TensorRT {version} cannot parse the ONNX Attention op (TensorRT >= 10.14 can). Upgrade it.")
    if "half" in results:
        counts["precision"] = dict(results["half"].details)
    lowered = tmp / "model.onnx"
    external = weights_file(source).is_file()  # keep big weights outside the protobuf's 2 GB limit
    ir.save(model, str(lowered), external_data=weights_file(lowered).name if external else None)
    return lowered, counts


def _sliding_window(artifact: Path) -> int | None:
    """The attention window the decoder uses, if narrower than its context (the plugin has no window): the family's
    config decides, as when the model was exported (a config it refuses is refused here too)."""
    from kiln.graphs import registry

    raw = hub.read_config(artifact)
    config = registry.architecture(raw).config.from_dict(raw)
    window, context = getattr(config, "sliding_window", None), getattr(config, "max_position_embeddings", 0)
    return window if isinstance(window, int) and 0 < window < context else None


def _engine_bytes(trt, onnx_path: Path, plan: PrecisionPlan, shapes: dict, timing_cache, version_compatible: bool,
                  has_plugin: bool) -> bytes:
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        Profile,
    )

    from kiln.kernels.attention.trt_plugin import register

    if has_plugin:
        register()  # the parser looks the plugin up in TensorRT's registry
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)  # the graph's types are the engine's
    profile = Profile()
    for name, (mn, opt, mx) in shapes.items():
        profile.add(name, min=mn, opt=opt, max=mx)
    load_cache = str(timing_cache) if timing_cache and Path(timing_cache).is_file() else None
    config = CreateConfig(profiles=[profile], load_timing_cache=load_cache,
                          version_compatible=version_compatible or None)
    try:
        return EngineBytesFromNetwork(network, config=config, save_timing_cache=timing_cache and str(timing_cache))()
    except Exception as err:  # Polygraphy raises PolygraphyException; TensorRT logs the details above it
        raise ExportError(f"TensorRT could not build the engine: {err}") from err


def _record(artifact: Path, entry: dict) -> None:
    """Add the engine to kiln.json, replacing an entry of the same key."""
    from kiln.artifact import update_manifest

    def add(manifest: dict) -> None:
        manifest["engines"] = [e for e in manifest.get("engines") or [] if e.get("key") != entry["key"]] + [entry]

    update_manifest(artifact, add)
