"""A Triton Inference Server model repository from an artifact (``kiln triton OUT REPO``).

``repository(OUT, ...)`` is a pure function: it reads the artifact and returns ``{relative path: content}`` for the
repository's files (text, bytes, or a ``Path`` to copy from the artifact, so that the weights are never read into
memory). ``write_repository(OUT, REPO, ...)`` writes them, each model directory whole or not at all.

For an artifact named ``NAME`` (options: ``name=``):

- ``NAME_model``: the ONNX graph on Triton's onnxruntime backend (``platform: "onnxruntime_onnx"``), or with
  ``tensorrt=True`` a TensorRT plan of ``kiln build`` (``platform: "tensorrt_plan"``; tied to the GPU and TensorRT
  version that built it, which its README.md and the config's header record); inputs and outputs from kiln.json,
  dynamic batching within the artifact's batch range, an instance group.
- ``NAME_preprocess``: a Python-backend model that tokenizes ``TEXT`` with the artifact's tokenizer.json
  (``kiln/serve/triton_models/preprocess.py``), for the tasks that take one text (``TEXT_TASKS``).
- ``NAME_postprocess`` and the ensemble ``NAME`` (``TEXT`` -> preprocess -> model -> postprocess): for
  feature-extraction (``EMBEDDING``: unit mean-pooled vectors) and text-classification (``SCORES``, and ``LABELS`` as
  JSON). token-classification and fill-mask get the model and the preprocess model, without an ensemble; other
  artifacts (question answering's text pairs, images) the model alone.

Decoders (text generation: a KV cache Triton's stateless models cannot carry between steps) and artifacts of several
graphs (Whisper's encoder + decoder, CLIP's towers) are refused. No Triton server runs where kiln is tested: the
configs are checked by parsing them with tritonclient's protobuf types and the Python models by running their code
with a stand-in for Triton's ``triton_python_backend_utils`` (tests/serve/test_triton.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from kiln.artifact import artifact_file, load_manifest, weights_file
from kiln.errors import InputError

ENSEMBLE_TASKS = ("feature-extraction", "text-classification")
# Tasks whose input is one text: the preprocess model (TEXT -> token ids) serves them; question answering takes pairs.
TEXT_TASKS = (*ENSEMBLE_TASKS, "token-classification", "fill-mask")
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what the preprocess model can produce
KINDS = ("KIND_CPU", "KIND_GPU")
DTYPES = {"bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
          "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
          "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
          "bfloat16": "TYPE_BF16", "string": "TYPE_STRING"}
MODELS_SOURCE = Path(__file__).with_name("triton_models")


class Enum(str):
    """An enum value (TYPE_FP32, KIND_GPU): bare in protobuf text format, where a string is quoted."""


class Map(dict):
    """A protobuf map field (parameters, input_map): one ``name { key: ... value: ... }`` block per entry."""


def pbtxt(message: dict, indent: int = 0) -> str:
    """A message (a dict: scalars, Enum, nested dicts, lists, Map) in protobuf text format, as Triton's config.pbtxt
    examples write it; None and empty lists are left out."""
    pad, out = "  " * indent, []
    for key, value in message.items():
        if value is None or value == []:
            continue
        if isinstance(value, Map):
            for k, v in value.items():
                out.append(f"{pad}{key} {{\n{pbtxt({'key': k, 'value': v}, indent + 1)}{pad}}}\n")
        elif isinstance(value, dict):
            out.append(f"{pad}{key} {{\n{pbtxt(value, indent + 1)}{pad}}}\n")
        elif isinstance(value, list) and isinstance(value[0], dict):
            items = ",\n".join(f"{pad}  {{\n{pbtxt(v, indent + 2)}{pad}  }}" for v in value)
            out.append(f"{pad}{key} [\n{items}\n{pad}]\n")
        elif isinstance(value, list):
            out.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]\n")
        else:
            out.append(f"{pad}{key}: {_scalar(value)}\n")
    return "".join(out)


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = "".join({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t"}.get(c, c) if c >= " " or c in "\n\t"
                      else f"\\{ord(c):03o}" for c in str(value))
    return f'"{escaped}"'


def _string_parameters(values: dict) -> Map:
    """Triton's ``parameters``: every value a string."""
    return Map({key: {"string_value": str(value)} for key, value in values.items()})


# ------------------------------------------------------------------------------------------------------ checks


def model_name(name: str) -> str:
    """A Triton model (and directory) name: letters, digits, ``_ . -``."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", name):
        raise InputError(f"Model name {name!r:.120} is not usable as a Triton model and directory name: use letters, "
                         "digits, '_', '.' and '-' (up to 100 characters, not starting with '.' or '-').")
    return name


def _check_artifact(directory: Path, manifest: dict) -> None:
    """Decoders and multi-graph artifacts are refused, naming what is supported."""
    supported = ("Supported: one-graph encoder artifacts (an ensemble with tokenization and post-processing for "
                 f"{' and '.join(ENSEMBLE_TASKS)}; the model and a tokenizer model for token-classification and "
                 "fill-mask; the model alone otherwise).")
    graphs = [key for key in ("encoder", "vision", "text") if isinstance(manifest.get(key), dict)]
    if graphs:
        raise InputError(f"{directory} is a {manifest['task']} artifact of several graphs ({', '.join(graphs)} beside "
                         f"{manifest['model']}); kiln triton writes one-graph artifacts only. {supported}")
    if manifest["task"] == "text-generation" or any(t["name"].startswith("past_key_values")
                                                     for t in manifest["inputs"]):
        raise InputError(f"{directory} is a decoder ({manifest['task']}): generation loops over the graph with a KV "
                         f"cache, which a stateless Triton model cannot carry between steps. {supported}")


def _engine(directory: Path, manifest: dict, precision: str | None) -> dict:
    """The TensorRT engine entry to serve: among those whose plan is present (of ``precision`` if given), the one
    built last, as ``kiln.runtime.engines.select`` prefers it."""
    entries = [e for e in manifest.get("engines") or [] if isinstance(e, dict) and isinstance(e.get("file"), str)]
    if not entries:
        raise InputError(f"{directory} has no TensorRT engine. Build one on the serving GPU with `kiln build "
                         f"{directory}`, or leave out --tensorrt to serve the ONNX graph.")
    fitting = [e for e in entries if precision is None or e.get("precision") == precision]
    if not fitting:
        built = ", ".join(sorted({str(e.get("precision")) for e in entries}))
        raise InputError(f"{directory} has no {precision} TensorRT engine (it has: {built}). Build one with `kiln "
                         f"build {directory} --precision {precision}`.")
    present = [e for e in fitting if artifact_file(directory, e["file"]).is_file()]
    if not present:
        raise InputError(f"{directory}: kiln.json lists {fitting[-1]['file']} but the plan is missing. Build it again "
                         f"with `kiln build {directory}`.")
    entry = present[-1]
    if entry.get("plugin"):
        raise InputError(f"{directory}: engine {entry.get('key')} runs kiln's attention plugin, which Triton's "
                         "TensorRT backend cannot load. Serve the ONNX graph (leave out --tensorrt).")
    return entry


def _batch_range(manifest: dict, engine: dict | None) -> tuple[int, int] | None:
    """(min, max) of the batch axis, narrowed to the engine's profile; None when a tensor does not lead with it."""
    tensors = manifest["inputs"] + manifest["outputs"]
    if not all(t.get("shape") and t["shape"][0] == "batch" for t in tensors):
        return None
    declared = (manifest.get("dynamic_axes") or {}).get("batch")
    if declared is None:
        return None
    low, high = declared["min"], declared["max"]
    if engine and (engine.get("axes") or {}).get("batch"):
        axis = engine["axes"]["batch"]  # (min, opt, max) the plan was built for
        low, high = max(low, axis[0]), min(high, axis[-1])
    return low, high


def _max_batch_size(directory: Path, asked: int | None, batch: tuple[int, int] | None) -> int:
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 0):
        raise InputError(f"max_batch_size must be a non-negative integer (0: no batching by Triton), got {asked!r}.")
    if batch is None:
        if asked:
            raise InputError(f"{directory} has no batch axis leading every input and output, so Triton cannot batch "
                             "it: use max_batch_size 0 (clients send whole batches).")
        return 0
    low, high = batch
    if asked is None:
        asked = high
    if asked and asked > high:
        raise InputError(f"max_batch_size {asked} is more than the batch the artifact takes (at most {high}). "
                         f"Use {high} or less, or re-export (or rebuild) with --batch 1:{asked}.")
    if asked and low > 1:
        raise InputError(f"{directory} takes batches of {low} to {high}, but Triton sends any batch from 1 up to "
                         "max_batch_size. Re-export with --batch 1:N, or use max_batch_size 0 (clients send whole "
                         "batches).")
    return asked


def _preferred(max_batch_size: int) -> list[int]:
    """Powers of two from 2 up to the maximum, and the maximum: the sizes the dynamic batcher waits to fill."""
    sizes = [2**i for i in range(1, max_batch_size.bit_length()) if 2**i < max_batch_size]
    return sizes + [max_batch_size] if max_batch_size > 1 else []


# ------------------------------------------------------------------------------------------------------ configs


def _tensor(record: dict, batched: bool) -> dict:
    """A ModelInput/ModelOutput from a kiln.json tensor: named axes are -1, the batch axis left out when Triton
    batches."""
    kind = record.get("dtype")
    if kind not in DTYPES:
        raise InputError(f"Tensor {record['name']!r} has dtype {kind!r}, which has no Triton type. Re-export the "
                         "artifact.")
    shape = list(record.get("shape") or [])[1 if batched else 0:]
    return {"name": record["name"], "data_type": Enum(DTYPES[kind]),
            "dims": [d if isinstance(d, int) else -1 for d in shape]}


def _io(name: str, dtype: str, dims: list[int], batched: bool) -> dict:
    return {"name": name, "data_type": Enum(dtype), "dims": dims if batched else [-1, *dims]}


def _header(lines: list[str]) -> str:
    return "".join("# " + line.replace("\n", " ") + "\n" for line in lines) + "\n"


def _config(name: str, header: list[str], **fields) -> str:
    return _header(header) + pbtxt({"name": name, **fields})


def _instances(count: int, kind: str) -> list[dict]:
    return [{"count": count, "kind": Enum(kind)}]


def repository(artifact_dir, *, name: str | None = None, max_batch_size: int | None = None, instances: int = 1,
               kind: str = "KIND_CPU", max_queue_delay_us: int = 100, tensorrt: bool = False,
               precision: str | None = None, pad_to_multiple_of: int = 1) -> dict[str, str | bytes | Path]:
    """The files of a Triton model repository serving ``artifact_dir``: {relative path: text, bytes, or a Path
    to copy}. ``max_batch_size``: default the artifact's largest batch, 0 turns Triton's batching off.
    ``instances``/``kind``: the model's instance group (KIND_GPU runs onnxruntime's CUDA provider); the Python models
    run ``instances`` CPU instances. ``tensorrt``: serve the artifact's TensorRT plan (``precision`` picks among
    several) instead of the ONNX graph; needs KIND_GPU. ``pad_to_multiple_of``: the preprocess model pads token
    arrays to a multiple of it, so that more requests share a shape and batch together."""
    directory = Path(artifact_dir)
    manifest = load_manifest(directory)
    _check_artifact(directory, manifest)
    name = model_name(name if name is not None else re.sub(r"[^A-Za-z0-9_.-]", "_", directory.resolve().name)
                      .lstrip(".-") or "model")
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    for option, value in (("instances", instances), ("pad_to_multiple_of", pad_to_multiple_of)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{option} must be a positive integer, got {value!r}.")
    if not isinstance(max_queue_delay_us, int) or isinstance(max_queue_delay_us, bool) or max_queue_delay_us < 0:
        raise InputError(f"max_queue_delay_us must be a non-negative integer, got {max_queue_delay_us!r}.")
    if precision is not None and not tensorrt:
        raise InputError("precision chooses among the artifact's TensorRT engines; pass it with tensorrt=True "
                         "(--tensorrt).")
    if tensorrt and kind != "KIND_GPU":
        raise InputError("A TensorRT plan runs on a GPU only: use kind='KIND_GPU' (--gpu) with tensorrt=True.")
    engine = _engine(directory, manifest, precision) if tensorrt else None
    mbs = _max_batch_size(directory, max_batch_size, _batch_range(manifest, engine))
    batched = mbs > 0
    source = [f"Written by kiln triton from {directory.resolve()} ({manifest['task']}, "
              f"{manifest.get('model_type') or 'model'}, kiln {manifest.get('kiln_version', '?')})."]

    files: dict[str, str | bytes | Path] = {}
    model = f"{name}_model"
    if engine is not None:
        built = (f"TensorRT plan {engine.get('key')}: built with TensorRT {engine.get('tensorrt')} for compute "
                 f"capability {engine.get('compute_capability')} ({engine.get('precision')}"
                 f"{', version-compatible' if engine.get('version_compatible') else ''}); it loads only there.")
        files[f"{model}/1/model.plan"] = artifact_file(directory, engine["file"])
        platform, header = "tensorrt_plan", [*source, built]
    else:
        graph = artifact_file(directory, manifest["model"])
        data = weights_file(graph)
        if data.is_file():  # Triton's onnxruntime backend loads model.onnx/model.onnx, finding the weights beside it
            files[f"{model}/1/model.onnx/model.onnx"] = graph
            files[f"{model}/1/model.onnx/{data.name}"] = data
        else:
            files[f"{model}/1/model.onnx"] = graph
        platform, header, built = "onnxruntime_onnx", source, None
    batching = {"preferred_batch_size": _preferred(mbs), "max_queue_delay_microseconds": max_queue_delay_us}
    files[f"{model}/config.pbtxt"] = _config(
        model, header, platform=platform, max_batch_size=mbs,
        input=[_tensor(t, batched) for t in manifest["inputs"]],
        output=[_tensor(t, batched) for t in manifest["outputs"]],
        dynamic_batching=batching if batched else None, instance_group=_instances(instances, kind))

    names = [model]
    inputs = [t["name"] for t in manifest["inputs"]]
    text = (manifest["task"] in TEXT_TASKS and (directory / "tokenizer.json").is_file() and bool(inputs)
            and set(inputs) <= set(TOKEN_INPUTS))
    if text:
        names.append(f"{name}_preprocess")
        files.update(_preprocess(directory, manifest, name, source, batched, mbs, instances, pad_to_multiple_of,
                                 engine))
    if text and manifest["task"] in ENSEMBLE_TASKS:
        post = _postprocess(directory, manifest, name, source, batched, mbs, instances)
        if post:
            files.update(post)
            files[f"{name}/config.pbtxt"] = _ensemble(manifest, name, source, batched, mbs)
            files[f"{name}/1/.keep"] = ""  # an ensemble has no model file, but Triton wants its version directory
            names += [f"{name}_postprocess", name]
    files[f"{model}/README.md"] = _readme(directory, manifest, name, names, mbs, kind, built)
    return files


def _preprocess(directory: Path, manifest: dict, name: str, source: list[str], batched: bool, mbs: int,
                instances: int, multiple: int, engine: dict | None) -> dict:
    from kiln.runtime.tokenizer import Tokenizer  # the settings exactly as kiln's pipelines load them

    tokenizer = Tokenizer.from_dir(directory, max_length=manifest.get("max_sequence_length"))
    max_length = tokenizer.max_length
    if engine and (engine.get("axes") or {}).get("sequence"):
        max_length = min(max_length, engine["axes"]["sequence"][-1])  # the plan's profile takes no longer rows
    model = f"{name}_preprocess"
    outputs = _preprocess_outputs(manifest)
    config = _config(
        model, source, backend="python", max_batch_size=mbs,
        input=[_io("TEXT", "TYPE_STRING", [1], batched)],
        output=[_io(o, dtype, [-1], batched) for o, dtype in outputs.items()],
        instance_group=_instances(instances, "KIND_CPU"),
        parameters=_string_parameters({"max_length": max_length, "pad_id": tokenizer.pad_id,
                                       "padding_side": tokenizer.padding_side, "pad_to_multiple_of": multiple}))
    files = {f"{model}/config.pbtxt": config, f"{model}/1/model.py": (MODELS_SOURCE / "preprocess.py").read_text()}
    files[f"{model}/1/tokenizer.json"] = directory / "tokenizer.json"
    return files


def _preprocess_outputs(manifest: dict) -> dict[str, str]:
    """{name: Triton type} of the token arrays the model takes (in its types), and the attention mask that mean
    pooling needs."""
    wanted = {t["name"]: DTYPES.get(t.get("dtype"), "TYPE_INT64") for t in manifest["inputs"]}
    if manifest["task"] == "feature-extraction":
        wanted.setdefault("attention_mask", "TYPE_INT64")
    return {name: wanted[name] for name in TOKEN_INPUTS if name in wanted}


def _output(manifest: dict, name: str) -> dict | None:
    return next((t for t in manifest["outputs"] if t["name"] == name), None)


def _postprocess(directory: Path, manifest: dict, name: str, source: list[str], batched: bool, mbs: int,
                 instances: int) -> dict | None:
    """The post-processing model's files; None when the artifact lacks the output it reads."""
    task, model = manifest["task"], f"{name}_postprocess"
    if task == "feature-extraction":
        hidden = _output(manifest, "last_hidden_state")
        if hidden is None or len(hidden.get("shape") or []) != 3:
            return None
        width = hidden["shape"][-1] if isinstance(hidden["shape"][-1], int) else -1
        mask = _preprocess_outputs(manifest)["attention_mask"]
        inputs = [_tensor(hidden, batched), _io("attention_mask", mask, [-1], batched)]
        outputs = [_io("EMBEDDING", "TYPE_FP32", [width], batched)]
        settings = {"task": task}
    else:
        logits = _output(manifest, "logits")
        if logits is None or len(logits.get("shape") or []) != 2:
            return None
        count = logits["shape"][-1] if isinstance(logits["shape"][-1], int) else -1
        inputs = [_tensor(logits, batched)]
        outputs = [_io("SCORES", "TYPE_FP32", [count], batched), _io("LABELS", "TYPE_STRING", [1], batched)]
        settings = {"task": task, **_labels(directory, count)}
    config = _config(model, source, backend="python", max_batch_size=mbs, input=inputs, output=outputs,
                     instance_group=_instances(instances, "KIND_CPU"))
    return {f"{model}/config.pbtxt": config, f"{model}/1/model.py": (MODELS_SOURCE / "postprocess.py").read_text(),
            f"{model}/1/postprocess.json": json.dumps(settings, indent=2, ensure_ascii=False) + "\n"}


def _labels(directory: Path, count: int) -> dict:
    """The classifier's labels in id order and its score function, read from config.json as kiln's pipeline does."""
    from kiln.files import read_json
    from kiln.runtime.scores import default_function

    config = read_json(directory / "config.json", "Re-export the artifact.")
    id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    count = count if count > 0 else (max(id2label) + 1 if id2label else 0)
    return {"labels": [id2label.get(i, f"LABEL_{i}") for i in range(count)],
            "function": default_function(config.get("problem_type"), count)}


def _ensemble(manifest: dict, name: str, source: list[str], batched: bool, mbs: int) -> str:
    """TEXT -> NAME_preprocess -> NAME_model -> NAME_postprocess; the tensors between the steps keep the model's
    names."""
    task = manifest["task"]
    tokens = _preprocess_outputs(manifest)
    model_inputs = [t["name"] for t in manifest["inputs"]]
    if task == "feature-extraction":
        hidden = _output(manifest, "last_hidden_state")
        width = hidden["shape"][-1] if isinstance(hidden["shape"][-1], int) else -1
        outputs, post_in, post_out = [_io("EMBEDDING", "TYPE_FP32", [width], batched)], \
            ["last_hidden_state", "attention_mask"], ["EMBEDDING"]
    else:
        logits = _output(manifest, "logits")
        count = logits["shape"][-1] if isinstance(logits["shape"][-1], int) else -1
        outputs = [_io("SCORES", "TYPE_FP32", [count], batched), _io("LABELS", "TYPE_STRING", [1], batched)]
        post_in, post_out = ["logits"], ["SCORES", "LABELS"]
    model_out = [n for n in post_in if n not in tokens]
    steps = [
        {"model_name": f"{name}_preprocess", "model_version": -1, "input_map": Map({"TEXT": "TEXT"}),
         "output_map": Map({t: t for t in tokens})},
        {"model_name": f"{name}_model", "model_version": -1, "input_map": Map({t: t for t in model_inputs}),
         "output_map": Map({t: t for t in model_out})},
        {"model_name": f"{name}_postprocess", "model_version": -1, "input_map": Map({t: t for t in post_in}),
         "output_map": Map({t: t for t in post_out})},
    ]
    return _config(name, source, platform="ensemble", max_batch_size=mbs,
                   input=[_io("TEXT", "TYPE_STRING", [1], batched)], output=outputs,
                   ensemble_scheduling={"step": steps})


def _readme(directory: Path, manifest: dict, name: str, names: list[str], mbs: int, kind: str,
            built: str | None) -> str:
    task = manifest["task"]
    lines = [f"# {name}: {task} on Triton Inference Server", "",
             f"Written by `kiln triton` from `{directory.resolve()}`. Models: {', '.join(f'`{n}`' for n in names)}.",
             ""]
    if name in names:
        outputs = "`EMBEDDING` (unit mean-pooled vectors)" if task == "feature-extraction" else \
            "`SCORES` (per label, in label-id order) and `LABELS` (JSON: labels and scores, best first)"
        lines += [f"Send `TEXT` (UTF-8 strings, shape [B, 1]) to `{name}`; it returns {outputs}.", ""]
    elif f"{name}_preprocess" in names:
        lines += [f"The ensemble covers {' and '.join(ENSEMBLE_TASKS)}; for {task}, call `{name}_preprocess` (TEXT "
                  f"-> token ids) and then `{name}_model`, and post-process its outputs in the client.", ""]
    lines += [f"max_batch_size {mbs}" + (" (Triton batches requests of the same shape)" if mbs else
                                         " (no batching by Triton: clients send whole batches)") + f"; {kind}.", ""]
    if built:
        lines += [built + " Rebuild it with `kiln build` on the serving GPU when either differs.", ""]
    if f"{name}_preprocess" in names:
        lines += ["The Python models need numpy and `tokenizers` in Triton's Python environment (`pip install "
                  "tokenizers` in the container, or an execution environment); they do not need kiln.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ writing


def write_repository(artifact_dir, repo_dir, *, force: bool = False, **options) -> list[str]:
    """Write :func:`repository` into ``repo_dir`` (created if missing; other models there are left alone) and return
    the model directories written. Each is staged in a temporary directory and renamed into place, the ensemble
    last, so a Triton polling the repository never sees half a model. An existing non-empty model directory is
    refused unless ``force``, which replaces it."""
    files = repository(artifact_dir, **options)
    repo = Path(repo_dir)
    if repo.exists() and not repo.is_dir():
        raise InputError(f"{repo} exists and is not a directory. Choose a directory for the Triton repository.")
    models = list(dict.fromkeys(path.split("/")[0] for path in files))
    ensemble = [m for m in models if not m.endswith(("_model", "_preprocess", "_postprocess"))]
    models = [m for m in models if m not in ensemble] + ensemble  # the ensemble after the models it calls
    taken = [m for m in models if (repo / m).exists() and (not (repo / m).is_dir() or any((repo / m).iterdir()))]
    if taken and not force:
        raise InputError(f"{repo} already holds {', '.join(taken)}. Pass --force to replace them, or --name to "
                         "write the models under another name.")
    repo.mkdir(parents=True, exist_ok=True)
    # Staged beside the repository (where Triton does not look) when on the same filesystem, so renames are atomic.
    parent = repo.resolve().parent
    staging_root = parent if os.stat(parent).st_dev == os.stat(repo).st_dev else repo
    staging = Path(tempfile.mkdtemp(prefix=f".{repo.name}.kiln-triton-", dir=staging_root))
    try:
        for path, content in files.items():
            target = staging / "new" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                _link_or_copy(content, target)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        (staging / "old").mkdir()
        for model in models:
            final = repo / model
            if final.exists() or final.is_symlink():
                os.replace(final, staging / "old" / model)
            os.replace(staging / "new" / model, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [str(repo / m) for m in models]


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows (the weights are not duplicated; kiln replaces artifact files by
    rename, never in place, so the link keeps the bytes it was made with), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
