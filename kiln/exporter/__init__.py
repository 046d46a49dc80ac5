"""Checkpoint -> validated ONNX artifact. ``export()`` is what ``kiln export`` runs."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

from kiln import __version__, hub
from kiln.artifact import MODEL_FILE, atomic_directory, file_hashes, weights_file, write_manifest
from kiln.errors import ExportError, InputError, ValidationError

log = logging.getLogger("kiln")
DEFAULT_OPSET = 23


class _Steps:
    """Numbered progress lines on the "kiln" logger: '[2/6] Tracing with torch.onnx ... done in 7.9s'."""

    def __init__(self, total: int):
        self.total, self.i, self.t0 = total, 0, None

    def __call__(self, message: str):
        self._finish()
        self.i += 1
        self.t0 = time.perf_counter()
        log.info("[%d/%d] %s", self.i, self.total, message)

    def _finish(self):
        if self.t0 is not None:
            log.info("      done in %.1fs", time.perf_counter() - self.t0)
            self.t0 = None


def export(model, output, task: str = "feature-extraction", *, opset: int = DEFAULT_OPSET, batch: str | None = None,
           seq: str | None = None, revision: str | None = None, keep_failed: bool = False, force: bool = True,
           output_hidden_states: bool = False, output_attentions: bool = False, precision: str = "fp32",
           force_precision: bool = False, framework: str = "torch", attention: str = "auto") -> dict:
    """Export ``model`` (directory or hub id) for ``task`` into the artifact directory ``output``; returns kiln.json.

    ``attention`` picks the form of encoder attention (``passes/attention_forms.py``): ``auto`` is the form measured
    fastest on onnxruntime's CPU provider for the precision (``DEFAULT_FORMS``); ``onnx`` keeps the traced standard
    ONNX Attention, the form TensorRT parses. ``framework`` picks the reference that is traced and validated
    against: ``torch`` (torch.onnx), ``jax`` (the flax nnx sibling through jax2onnx) or ``tf`` (the keras sibling
    through tf2onnx). The artifact format is the same.

    Raises ValidationError (with the numbers) if the graph disagrees with the reference, or if a reduced
    ``precision`` (fp16, bf16, int8, int4) falls below its accuracy gate and ``force_precision`` is not set; then nothing is
    written unless ``keep_failed``, which leaves the failed artifact at ``<output>.failed`` for inspection.
    """
    from kiln.exporter.passes.quantize import PRECISIONS

    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r} is not supported for ONNX export; choose one of "
                         f"{', '.join(PRECISIONS)}.")
    from kiln.exporter.passes.attention_forms import FORMS

    if attention not in ("auto", *FORMS):
        raise InputError(f"--attention {attention!r}: choose auto or one of {', '.join(FORMS)}.")
    form = DEFAULT_FORMS.get(precision, "onnx") if attention == "auto" else attention
    import importlib

    import onnx

    from kiln.exporter.specs import AxisRange, spec_for
    from kiln.exporter.validate import describe_failure, validate
    from kiln.graphs import registry
    from kiln.graphs.checkpoint import check_framework, read_state_dict

    steps = _Steps(5 if precision == "fp32" else 6)
    started = time.perf_counter()
    steps(f"Resolving {model}")
    checkpoint = hub.resolve(model, revision)
    raw = hub.read_config(checkpoint)
    registry.check_task(raw, task)
    arch = registry.architecture(raw)
    check_framework(arch, raw, framework)
    weights_sha = hub.sha256_files(checkpoint.weight_files)

    steps(f"Loading the {FRAMEWORK_NAMES[framework]} reference ({raw['model_type']}, {task})")
    reference = arch.build(raw, task, read_state_dict(checkpoint.weight_files, framework), framework=framework)
    if framework == "torch":
        reference.eval()
    tracer = importlib.import_module(f"kiln.exporter.trace_{framework}")
    try:
        ranges = {"batch": AxisRange.parse(batch, None, "batch"), "seq": AxisRange.parse(seq, None, "seq")}
        spec = spec_for(registry.package_for(raw), reference, task, **ranges, hidden_states=output_hidden_states,
                        attentions=output_attentions)
    except ValueError as err:
        raise InputError(str(err)) from None

    with atomic_directory(output, overwrite=force, keep_failed=keep_failed) as tmp:
        steps(f"Tracing with {TRACERS[framework]} (opset {opset})")
        onnx_path = tracer.trace(reference, spec, tmp / MODEL_FILE, opset=opset)
        proto = onnx.load(str(onnx_path), load_external_data=False)
        ops = Counter(node.op_type for node in proto.graph.node)
        # A converter may write a lower opset than asked (tf2onnx tops out below 23): record the graph's own.
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
        lowering = _attention_lowering(ops, reference.config.num_hidden_layers, framework, output_attentions)
        if lowering != "onnx-attention":
            form = lowering  # decomposed by the converter: no fused node to put in another form
        rewrite_to = form if lowering == "onnx-attention" and form != "onnx" else None
        rotary_wanted = task == "text-generation" and attention != "onnx" and precision not in ("fp16", "bf16")
        rewritten, rotary, keep_logits, ops = _graph_passes(onnx_path, rewrite_to, rotary_wanted,
                                                            task == "text-generation", ops)
        if rotary and rewritten:
            form = "onnx-3d"  # a decoder's attention fed (B, T, C), whatever the encoder form for this precision
        elif rewrite_to and not rewritten:
            form = "onnx"  # no layer had the traced encoder pattern

        steps("Validating against the reference on shapes "
              + ", ".join("x".join(map(str, size.values())) for size in spec.validation_sizes()))
        runner = tracer.reference_runner(reference, [o.name for o in spec.outputs])
        report = validate(runner, spec, onnx_path)

        copied = _write_config_and_tokenizer(checkpoint, raw, tmp)
        accuracy = None
        if precision != "fp32" and report["passed"]:
            steps(f"Converting to {precision} and measuring its accuracy against the fp32 reference")
            accuracy, ops = _reduce_precision(runner, spec, tmp, precision)
        steps("Writing the artifact")
        manifest = _manifest(checkpoint, weights_sha, raw, task, opset, spec, ops, report, copied, framework, lowering)
        manifest["attention"].update(form=form, rotary_nodes=rotary)
        if keep_logits:  # inputs with a default, that callers may feed
            from kiln.exporter.passes.logits import OPTIONAL_INPUT

            manifest["optional_inputs"] = [dict(OPTIONAL_INPUT)]
        manifest.update(precision=precision, accuracy=accuracy)
        manifest["export"]["seconds"] = round(time.perf_counter() - started, 2)
        manifest["files"] = file_hashes(tmp)  # `kiln run --verify` checks these
        write_manifest(tmp, manifest)
        where = f" The failed artifact is kept at {Path(output)}.failed." if keep_failed else ""
        if not report["passed"]:
            raise ValidationError(f"Validation failed: {describe_failure(report)}.{where}", report)
        if accuracy is not None and not accuracy["passed"] and not force_precision:
            metric = next(iter(accuracy))
            raise ValidationError(f"{precision} is below its accuracy gate: {metric} {accuracy[metric]:.4f} < "
                                  f"{accuracy['gate']} against the fp32 reference. Keep fp32, or pass "
                                  f"--force-precision to write it anyway.{where}", accuracy)
    steps._finish()
    log.info("Artifact written to %s (validation passed)", output)
    return manifest


# The encoder attention form per precision, from benchmarks/bench_attention_forms.py on onnxruntime CPU
# (benchmarks/RESULTS.md, "Attention forms"): feeding (B, T, C) straight into Attention was fastest or within ~2%
# of the fastest at every shape, fp32 and int8 (1-14% over the traced form); com.microsoft.Attention was level.
# fp16/bf16 artifacts are for GPUs and TensorRT: the traced form. (kiln build turns 3-D attention back into 4-D.)
DEFAULT_FORMS = {"fp32": "onnx-3d", "int8": "onnx-3d", "int4": "onnx", "fp16": "onnx", "bf16": "onnx"}


def _graph_passes(onnx_path: Path, form: str | None, rotary: bool, decoder: bool,
                  ops: Counter) -> tuple[int, int, bool, Counter]:
    """The traced graph rewritten for onnxruntime, loaded and saved once: encoder attention into ``form`` where its
    layers match, and for decoders (``rotary``) RoPE as standard RotaryEmbedding nodes (decode measured 4.9% faster on
    SmolLM2) with the KV-cache attention fed (B, T, C) (``decoder_3d``; ``kiln build`` turns both back for TensorRT)
    and q/k/v and gate/up each computed by one packed MatMul (``passes/pack.py``; decode 4-6% faster). Every
    ``decoder`` gets the ``logits_to_keep`` input (``passes/logits.py``; prefill 11-17% faster on SmolLM2).
    Returns (layers rewritten, RotaryEmbedding nodes written, whether logits_to_keep was added, op counts)."""
    if form is None and not rotary and not decoder:
        return 0, 0, False, ops
    import onnx_ir as ir

    from kiln.exporter.passes.attention_forms import decoder_3d, rewrite
    from kiln.exporter.passes.logits import keep_last_logits
    from kiln.exporter.passes.pack import pack_projections
    from kiln.exporter.passes.rotary import fuse_rotary

    model = ir.load(str(onnx_path))
    rewritten = rewrite(model, form)["rewritten"] if form else 0
    fused = fuse_rotary(model) if rotary else 0
    rewritten += decoder_3d(model) if fused else 0
    packed = pack_projections(model) if rotary else 0
    kept = keep_last_logits(model) if decoder else False
    if not rewritten and not fused and not packed and not kept:
        return 0, 0, False, ops
    weights = weights_file(onnx_path)
    if weights.is_file():  # the weights are read before their file is written over (else onnx_ir warns per tensor)
        ir.external_data.load_to_model(model)
    ir.save(model, str(onnx_path), external_data=weights.name if weights.is_file() else None)
    return rewritten, fused, kept, Counter(node.op_type for node in model.graph)


FRAMEWORK_NAMES = {"torch": "PyTorch", "jax": "JAX (flax nnx)", "tf": "TensorFlow (keras)"}
TRACERS = {"torch": "torch.onnx (dynamo)", "jax": "jax2onnx", "tf": "tf2onnx"}


def _attention_lowering(ops: Counter, layers: int, framework: str, probabilities: bool = False) -> str:
    """``onnx-attention`` when every layer's attention is one standard ONNX ``Attention`` node. torch.onnx always
    manages (anything else is an error); tf2onnx has no Attention op, and the JAX reference computes returned
    probabilities with eager math, so those graphs keep MatMul/Softmax (``decomposed``, said in kiln.json and
    ``kiln inspect``)."""
    if ops["Attention"] == layers:
        return "onnx-attention"
    if framework == "torch" or ops["Attention"]:
        raise ExportError(f"Expected {layers} fused ONNX Attention nodes (one per layer), found {ops['Attention']}. "
                          "The attention was not captured as one op; check the opset and the converter's version.")
    why = ("the JAX reference returns attention probabilities with eager math" if framework == "jax" and probabilities
           else f"{TRACERS[framework]} emits no fused ONNX Attention op for this model")
    log.warning("Attention stays MatMul/Softmax (%d Softmax nodes): %s.", ops["Softmax"], why)
    return "decomposed"


def _reduce_precision(reference, spec, directory: Path, precision: str):
    """Replace model.onnx by its ``precision`` version; returns (accuracy figures, op counts of the new graph)."""
    import onnx

    from kiln.exporter.passes.quantize import accuracy, accuracy_model, quantize, remove_graph, replace_graph

    fp32, reduced = directory / MODEL_FILE, directory / f"model.{precision}.onnx"
    quantize(fp32, reduced, precision, weight_only=spec.task == "text-generation")
    measured = accuracy_model(fp32, reduced, precision)  # bf16: an fp32 simulation, since the CPU cannot run it
    figures = accuracy(reference, spec, measured, directory)
    if measured != reduced:
        figures["measured_on"] = f"fp32 simulation of {precision} (values rounded to {precision} where the graph has them)"
        remove_graph(measured)
    replace_graph(reduced, fp32)
    ops = Counter(node.op_type for node in onnx.load(str(fp32), load_external_data=False).graph.node)
    log.info("      %s", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    return figures, ops


def _write_config_and_tokenizer(checkpoint, raw: dict, target: Path) -> list[str]:
    """config.json unchanged, plus the tokenizer files. A GGUF file has neither: write the config derived from its
    metadata and the tokenizer rebuilt from its vocabulary (or, for tokenizers kiln cannot rebuild, the files found
    beside it)."""
    if checkpoint.gguf is None:
        shutil.copyfile(checkpoint.path / "config.json", target / "config.json")
        return _copy_tokenizer(checkpoint.path, target)
    from kiln import gguf

    (target / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return gguf.write_tokenizer(checkpoint.gguf, target) or _copy_tokenizer(checkpoint.path, target)


def _copy_tokenizer(source: Path, target: Path) -> list[str]:
    copied = []
    for name in (*hub.TOKENIZER_FILES, *hub.PROCESSOR_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "preprocessor_config.json" not in copied:
        log.warning("The checkpoint has no tokenizer.json: the artifact can run raw feeds but not text pipelines. "
                    "Save the fast tokenizer (AutoTokenizer(...).save_pretrained) into the checkpoint and re-export.")
    return copied


def _framework_versions(framework: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    packages = {"torch": ("torch",), "jax": ("jax", "flax", "jax2onnx"),
                "tf": ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx")}[framework]
    found = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _manifest(checkpoint, weights_sha, raw, task, opset, spec, ops, report, tokenizer_files, framework="torch",
              lowering="onnx-attention") -> dict:
    import onnx
    import onnxruntime

    return {
        "kiln_version": __version__,
        "source": {"id": checkpoint.source, "path": str(checkpoint.path), "revision": checkpoint.revision,
                   "weight_files": [p.name for p in checkpoint.weight_files], "weights_sha256": weights_sha},
        "architecture": raw.get("architectures", [None])[0] if raw.get("architectures") else None,
        "model_type": raw["model_type"],
        "task": task,
        "framework": framework,
        "model": MODEL_FILE,
        "opset": opset,
        "precision": "fp32",
        "attention": {"lowering": lowering, "nodes": ops["Attention"]},
        "inputs": [t.to_json() for t in spec.inputs],
        "outputs": [t.to_json() for t in spec.outputs],
        "dynamic_axes": {name: {"min": r.min, "max": r.max} for name, r in spec.axes.items()},
        "max_sequence_length": spec.axes["sequence"].max if "sequence" in spec.axes else None,
        "op_counts": dict(sorted(ops.items())),
        "preprocessing_files": tokenizer_files,
        "validation": report,
        "engines": [],
        "export": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **_framework_versions(framework),
                   "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
