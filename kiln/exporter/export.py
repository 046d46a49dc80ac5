"""Checkpoint -> validated ONNX artifact, as named steps: resolve -> reference -> trace -> passes -> validate -> write.

``export()`` reads top to bottom as those steps; each is a function below. What the graph passes do is decided up
front by ``kiln.exporter.plan.ExportPlan`` (pure data), and the passes' results decide what kiln.json records.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kiln import hub
from kiln.version import __version__
from kiln.artifact import MODEL_FILE, atomic_directory, file_hashes, weights_file, write_manifest
from kiln.errors import ConfigError, ExportError, InputError, ValidationError
from kiln.exporter.plan import TRACED, ExportPlan
from kiln.exporter.specs import COMPANIONS

log = logging.getLogger("kiln")
DEFAULT_OPSET = 23


@dataclass(frozen=True)
class ExportOptions:
    """``kiln export``'s options (see ``kiln export -h``)."""

    task: str = "feature-extraction"
    opset: int = DEFAULT_OPSET
    batch: str | None = None  # MIN:MAX of the dynamic batch axis
    seq: str | None = None  # MIN:MAX of the dynamic sequence axis
    revision: str | None = None
    keep_failed: bool = False  # leave a failed artifact at OUT.failed
    force: bool = True  # replace an existing artifact
    output_hidden_states: bool = False
    output_attentions: bool = False
    precision: str = "fp32"
    force_precision: bool = False  # write a reduced precision below its accuracy gate
    framework: str = "torch"
    attention: str = "auto"
    head_mask: bool = False  # an optional head_mask (layers, heads) input, default all ones


@dataclass
class Source:
    """The resolved checkpoint: where it is, its config.json and its family's record."""

    checkpoint: hub.Checkpoint
    raw: dict
    arch: object  # kiln.graphs.registry.Architecture
    weights_sha256: str


@dataclass
class Traced:
    """The traced graph and what the converter made of attention (``onnx-attention`` or ``decomposed``)."""

    path: Path
    opset: int
    lowering: str
    ops: Counter
    model: object = None  # the onnx_ir model as loaded once after tracing, handed to the passes, then dropped


def export(model, output, task: str = "feature-extraction", **options) -> dict:
    """Export ``model`` (directory, hub id or GGUF file) for ``task`` into the artifact directory ``output``; returns
    kiln.json. Raises ValidationError (with the numbers) if the graph disagrees with the reference, or if a reduced
    ``precision`` falls below its accuracy gate and ``force_precision`` is not set; then nothing is written unless
    ``keep_failed``, which leaves the failed artifact at ``<output>.failed`` for inspection."""
    if options.get("precision") == "auto":  # every candidate exported and gated, the fastest here kept
        from kiln.exporter.auto import export_auto

        return export_auto(model, output, task, **{k: v for k, v in options.items() if k != "precision"})
    opts = ExportOptions(task=task, **options)
    ExportPlan("encoder", opts.precision, opts.attention)  # the options' own errors come before any work
    steps, started = Progress(5 if opts.precision == "fp32" else 6), time.perf_counter()
    steps(f"Resolving {model}")
    source = resolve(model, opts)
    steps.total += 2 * len(COMPANIONS.get(source.arch.spec, {}))  # each further graph is traced and validated
    steps(f"Loading the {framework_title(opts.framework)} reference ({source.raw['model_type']}, {task})")
    reference, spec = load_reference(source, opts)
    graphs = graphs_to_export(source, reference, spec, opts)
    with atomic_directory(output, overwrite=opts.force, keep_failed=opts.keep_failed) as tmp:
        for graph in graphs:
            steps(f"Tracing {graph.title}with {converter(opts.framework)} (opset {opts.opset})")
            graph.traced = trace(graph.module, graph.spec, tmp / graph.file, opts)
            graph.results = run_passes(graph.plan, graph.traced)
            steps(f"Validating {graph.title}against the reference on shapes "
                  + ", ".join("x".join(map(str, size.values())) for size in graph.spec.validation_sizes()))
            graph.runner = tracer_for(opts.framework).reference_runner(graph.module,
                                                                       [o.name for o in graph.spec.outputs])
            graph.report = validate(graph.runner, graph.spec, graph.traced.path)
        main, *companions = graphs
        preprocessing = copy_preprocessing(source.checkpoint, tmp)
        accuracy = None
        if opts.precision != "fp32" and all(graph.report["passed"] for graph in graphs):
            steps(f"Converting to {opts.precision} and measuring its accuracy against the fp32 reference")
            if companions:
                from kiln.exporter.precision import reduce_dual_encoder_precision, reduce_encoder_decoder_precision

                reduce = reduce_dual_encoder_precision if source.arch.spec == "dual-encoder" \
                    else reduce_encoder_decoder_precision
                accuracy, ops = reduce({graph.name: graph.runner for graph in graphs},
                                       {graph.name: graph.spec for graph in graphs}, tmp,
                                       {graph.name: graph.file for graph in graphs}, opts.precision)
                for graph in graphs:
                    graph.traced.ops = ops[graph.name]
            else:
                accuracy, main.traced.ops = reduce_precision(main.runner, main.spec, tmp, opts.precision)
        steps("Writing the artifact")
        manifest = build_manifest(source, opts, main.plan, main.spec, main.traced, main.results, main.report,
                                  accuracy, preprocessing, model_file=main.file)
        for graph in companions:  # kiln.json's top describes the main graph; each other graph has a record
            manifest[graph.name] = graph_record(graph)
        if source.arch.spec == "dual-encoder":
            manifest["zero_shot"] = zero_shot_facts(reference, source.raw)
        manifest["export"]["seconds"] = round(time.perf_counter() - started, 2)
        manifest["files"] = file_hashes(tmp)  # `kiln run --verify` checks these
        write_manifest(tmp, manifest)
        for graph in companions:
            refuse_failures(graph.report, None, opts, output, graph.title)
        refuse_failures(main.report, accuracy, opts, output)
    steps.finish()
    log.info("Artifact written to %s (validation passed)", output)
    return manifest


@dataclass
class Graph:
    """One graph of the artifact: what is traced (``module``), its spec and plan, and what tracing, the passes and
    validation made of it."""

    name: str  # "model" for a one-graph artifact; "decoder" / "encoder" for an encoder-decoder
    file: str
    module: object
    spec: object
    plan: ExportPlan
    traced: Traced | None = None
    results: dict | None = None
    report: dict | None = None
    runner: object = None

    @property
    def title(self) -> str:
        return "" if self.name == "model" else f"the {self.name} "


def graphs_to_export(source: Source, reference, spec, opts: ExportOptions) -> list[Graph]:
    """The artifact's graphs, the main one (run per step) first: one for most families; an encoder-decoder's
    decoder and encoder (``Architecture.spec`` names a layout in ``specs.COMPANIONS``)."""
    defaults = ("head_mask",) if opts.head_mask else ()
    kind = source.arch.spec
    if kind not in COMPANIONS:
        plan = ExportPlan("decoder" if kind == "decoder" else "encoder", opts.precision, opts.attention,
                          defaults=defaults)
        return [Graph("model", MODEL_FILE, reference, spec, plan)]
    modules = reference.export_graphs()
    main = next(iter(modules))
    # The traced attention form only, and logits_to_keep: the decoder passes' rotary, 3-D and packing rewrites
    # expect a decoder-only layout, not cross-attention (to be measured before they are enabled here). A dual
    # encoder's towers are two encoders.
    main_kind = "decoder" if kind == "speech-seq2seq" else "encoder"
    graphs = [Graph(main, f"{main}.onnx", modules[main], spec, ExportPlan(main_kind, opts.precision, "onnx"))]
    for name, companion in COMPANIONS[kind].items():
        graphs.append(Graph(name, f"{name}.onnx", modules[name], companion(reference, opts.task),
                            ExportPlan("encoder", opts.precision, "onnx")))
    return graphs


def zero_shot_facts(reference, raw: dict) -> dict:
    """kiln.json ``zero_shot``: what scoring an image + text artifact's embeddings needs from the weights (the
    runtime's ``kiln.runtime.dual_encoder``)."""
    bias = getattr(reference, "logit_bias", None)
    facts = {"logit_scale": float(reference.logit_scale.detach().exp()),
             "function": "softmax" if bias is None else "sigmoid"}
    if bias is not None:
        facts["logit_bias"] = float(bias.detach().reshape(-1)[0])
    if "siglip" in raw.get("model_type", ""):  # as transformers' pipeline: prompts padded to 64, the length it was
        facts["text_max_length"] = min(64, reference.config.text.max_position_embeddings)  # trained at
    return facts


def graph_record(graph: Graph) -> dict:
    """kiln.json's record of a graph other than the main one: its file, interface, attention and validation."""
    traced = graph.traced
    return {"model": graph.file, "opset": traced.opset,
            "attention": {"lowering": traced.lowering, "nodes": traced.ops["Attention"],
                          **graph.plan.attention_record(traced.lowering, graph.results)},
            "inputs": [t.to_json() for t in graph.spec.inputs], "outputs": [t.to_json() for t in graph.spec.outputs],
            "dynamic_axes": {name: {"min": r.min, "max": r.max} for name, r in graph.spec.axes.items()},
            "op_counts": dict(sorted(traced.ops.items())), "validation": graph.report}


class Progress:
    """Numbered progress lines on the "kiln" logger: '[2/6] Tracing with torch.onnx ... done in 7.9s'."""

    def __init__(self, total: int):
        self.total, self.i, self.t0 = total, 0, None

    def __call__(self, message: str):
        self.finish()
        self.i += 1
        self.t0 = time.perf_counter()
        log.info("[%d/%d] %s", self.i, self.total, message)

    def finish(self):
        if self.t0 is not None:
            log.info("      done in %.1fs", time.perf_counter() - self.t0)
            self.t0 = None


def framework_title(framework: str) -> str:
    from kiln.graphs.registry import FRAMEWORKS

    return FRAMEWORKS[framework].title if framework in FRAMEWORKS else framework


def converter(framework: str) -> str:
    from kiln.graphs.registry import FRAMEWORKS

    return FRAMEWORKS[framework].converter


def tracer_for(framework: str):
    from kiln.exporter.trace import tracer

    return tracer(framework)


def resolve(model, opts: ExportOptions) -> Source:
    """The checkpoint, its config and family, with the task and framework checked against the family."""
    from kiln.graphs import registry

    checkpoint = hub.resolve(model, opts.revision)
    raw = hub.read_config(checkpoint)
    arch = registry.architecture(raw)
    arch.check_task(raw["model_type"], opts.task)
    if arch.spec in COMPANIONS and (opts.precision not in ("fp32", "int8", "fp16") or opts.head_mask):
        kind = {"speech-seq2seq": "encoder-decoder", "dual-encoder": "image + text"}[arch.spec]
        raise InputError(f"{raw['model_type']} exports at fp32, int8 or fp16 without --head-mask for now: "
                         f"{'--head-mask' if opts.head_mask else opts.precision} for {kind} artifacts is not "
                         "implemented yet.")
    arch.check_framework(raw["model_type"], opts.framework)
    check_vocabulary(checkpoint, raw)
    return Source(checkpoint, raw, arch, hub.sha256_files(checkpoint.source_files))


def check_vocabulary(checkpoint: hub.Checkpoint, raw: dict) -> None:
    """A tokenizer with more tokens than the model has embedding rows gives ids that index past the table (tokens
    added without resizing the model, or the model resized below the tokenizer): refuse it, naming the fix."""
    path = checkpoint.path / "tokenizer.json"
    rows = raw.get("vocab_size")
    if not path.is_file() or not isinstance(rows, int):
        return
    from tokenizers import Tokenizer

    try:
        tokens = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception:  # an unreadable tokenizer is reported where the tokenizer is loaded
        return
    if tokens > rows:
        raise InputError(f"The tokenizer has {tokens} tokens but the model's embedding has {rows} rows "
                         f"(config.json vocab_size): ids from {rows} up would index past it. Resize the model to the "
                         "tokenizer (model.resize_token_embeddings(len(tokenizer)); model.save_pretrained(dir)) and "
                         "export that.")


def load_reference(source: Source, opts: ExportOptions):
    """The framework's reference with the checkpoint's weights, and the spec of the graph to export."""
    from kiln.exporter.specs import AxisRange, spec_for, with_head_mask
    from kiln.graphs import registry
    from kiln.graphs.checkpoint import read_state_dict

    state = read_state_dict(source.checkpoint.weight_files, opts.framework)
    reference = registry.build(source.raw, opts.task, state, framework=opts.framework)
    if opts.framework == "torch":
        reference.eval()
    generation = source.checkpoint.path / "generation_config.json"
    if hasattr(reference, "use_generation_config") and generation.is_file():  # Whisper's alignment heads
        reference.use_generation_config(hub.read_json(generation, "Restore it from the original checkpoint.",
                                                      error=ConfigError))
    processor = source.checkpoint.path / "preprocessor_config.json"
    if hasattr(reference, "use_preprocessor_config") and processor.is_file():  # DINOv2: exported at the crop size
        reference.use_preprocessor_config(hub.read_json(processor, "Restore it from the original checkpoint.",
                                                        error=ConfigError))
    try:
        ranges = {"batch": AxisRange.parse(opts.batch, None, "batch"), "seq": AxisRange.parse(opts.seq, None, "seq")}
        spec = spec_for(source.arch.spec, reference, opts.task, **ranges, hidden_states=opts.output_hidden_states,
                        attentions=opts.output_attentions)
    except ValueError as err:
        raise InputError(str(err)) from None
    if opts.head_mask:
        if opts.framework != "torch":
            raise InputError("--head-mask is exported from the PyTorch reference only; leave --framework out.")
        if "head_mask" not in inspect.signature(reference.forward).parameters:
            raise InputError(f"--head-mask: {source.raw['model_type']} models take no head mask (as in transformers); "
                             "leave --head-mask out.")
        spec = with_head_mask(spec, reference.config.num_hidden_layers, reference.config.num_attention_heads)
    return reference, spec


def trace(reference, spec, path: Path, opts: ExportOptions) -> Traced:
    """model.onnx written by the framework's converter, loaded once (the passes take it from here), and how it
    wrote attention."""
    import onnx_ir as ir

    path = tracer_for(opts.framework).trace(reference, spec, path, opset=opts.opset)
    model = ir.load(str(path))  # weights kept in an external file stay there until read
    ops = Counter(node.op_type for node in model.graph)
    # A converter may write a lower opset than asked (tf2onnx tops out below 23): record the graph's own.
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", opts.opset))
    # one fused node per attention: a graph module of a multi-graph artifact says how many it has
    nodes = reference.attention_nodes if hasattr(reference, "attention_nodes") else reference.config.num_hidden_layers
    return Traced(path, opset, attention_lowering(ops, nodes, opts.framework, opts.output_attentions), ops, model)


def attention_lowering(ops: Counter, nodes: int, framework: str, probabilities: bool = False) -> str:
    """``onnx-attention`` when every layer's attention is one standard ONNX ``Attention`` node. torch.onnx always
    manages (anything else is an error); tf2onnx has no Attention op, and the JAX reference computes returned
    probabilities with eager math, so those graphs keep MatMul/Softmax (``decomposed``, said in kiln.json and
    ``kiln inspect``)."""
    if ops["Attention"] == nodes:
        return TRACED
    if framework == "torch" or ops["Attention"]:
        raise ExportError(f"Expected {nodes} fused ONNX Attention nodes (one per attention), found {ops['Attention']}. "
                          "The attention was not captured as one op; check the opset and the converter's version.")
    why = ("the JAX reference returns attention probabilities with eager math" if framework == "jax" and probabilities
           else f"{converter(framework)} emits no fused ONNX Attention op for this model")
    log.warning("Attention stays MatMul/Softmax (%d Softmax nodes): %s.", ops["Softmax"], why)
    return "decomposed"


def run_passes(plan: ExportPlan, traced: Traced) -> dict:
    """The plan's graph passes on the traced graph (as ``trace`` loaded it), saved once; returns their results by
    name."""
    steps, model, traced.model = plan.passes(traced.lowering), traced.model, None
    if not steps:
        return {}
    import onnx_ir as ir

    from kiln.exporter import passes

    results = passes.run(model, steps)
    if not any(result.modified for result in results.values()):
        return results
    weights = weights_file(traced.path)
    if weights.is_file():  # the weights are read before their file is written over (else onnx_ir warns per tensor)
        ir.external_data.load_to_model(model)
    ir.save(model, str(traced.path), external_data=weights.name if weights.is_file() else None)
    traced.ops = Counter(node.op_type for node in model.graph)
    traced.opset = model.opset_imports.get("", traced.opset)  # a pass may need a newer one
    return results


def validate(runner, spec, path: Path) -> dict:
    from kiln.exporter.validate import validate as _validate

    return _validate(runner, spec, path)


def reduce_precision(runner, spec, directory: Path, precision: str):
    from kiln.exporter.precision import reduce_precision as _reduce

    return _reduce(runner, spec, directory, precision)


def copy_preprocessing(checkpoint: hub.Checkpoint, target: Path) -> list[str]:
    """config.json unchanged, plus the tokenizer or image processor files and the generation config; returns the
    names of those copied."""
    shutil.copyfile(checkpoint.path / "config.json", target / "config.json")
    copied = hub.copy_preprocessing_files(checkpoint.path, target)
    if "tokenizer.json" not in copied:
        from kiln.exporter import sentencepiece

        if sentencepiece.sentencepiece_model(checkpoint.path) is not None:
            copied.append(sentencepiece.convert(checkpoint.path, target))
    if "tokenizer.json" not in copied and "preprocessor_config.json" not in copied:
        log.warning("The checkpoint has no tokenizer.json: the artifact can run raw feeds but not text pipelines. "
                    "Save the fast tokenizer (AutoTokenizer(...).save_pretrained) into the checkpoint and re-export.")
    return copied


def build_manifest(source: Source, opts: ExportOptions, plan: ExportPlan, spec, traced: Traced, results: dict,
                   report: dict, accuracy: dict | None, preprocessing: list[str], model_file: str = MODEL_FILE) -> dict:
    """kiln.json (``kiln.artifact`` writes it)."""
    import onnx
    import onnxruntime

    checkpoint, raw = source.checkpoint, source.raw
    optional = plan.optional_inputs(results)  # inputs with a default, that callers may feed
    manifest = {
        "kiln_version": __version__,
        "source": {"id": checkpoint.source, "path": str(checkpoint.source_dir), "revision": checkpoint.revision,
                   "weight_files": [p.name for p in checkpoint.source_files], "weights_sha256": source.weights_sha256},
        "architecture": raw.get("architectures", [None])[0] if raw.get("architectures") else None,
        "model_type": raw["model_type"],
        "task": opts.task,
        "framework": opts.framework,
        "model": model_file,
        "opset": traced.opset,
        "precision": opts.precision,
        "attention": {"lowering": traced.lowering, "nodes": traced.ops["Attention"],
                      **plan.attention_record(traced.lowering, results)},
        "inputs": [t.to_json() for t in spec.inputs if t.name not in {o["name"] for o in optional}],
        "outputs": [t.to_json() for t in spec.outputs],
        "dynamic_axes": {name: {"min": r.min, "max": r.max} for name, r in spec.axes.items()},
        "max_sequence_length": spec.axes["sequence"].max if "sequence" in spec.axes else None,
        "op_counts": dict(sorted(traced.ops.items())),
        "preprocessing_files": preprocessing,
        "validation": report,
        "engines": [],
        "export": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   **_versions(opts.framework), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    if optional:
        manifest["optional_inputs"] = optional
    if spec.extra.get("recompute_cache_at"):  # read by the runtime's decode loop (kiln.runtime.generate.loop)
        manifest["decoder"] = {"recompute_cache_at": spec.extra["recompute_cache_at"]}
    manifest["accuracy"] = accuracy
    return manifest


def _versions(framework: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from kiln.graphs.registry import FRAMEWORKS

    found = {}
    for name in FRAMEWORKS[framework].packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def refuse_failures(report: dict, accuracy: dict | None, opts: ExportOptions, output, title: str = "") -> None:
    """A ValidationError (the artifact is then not written) for a graph that disagrees with the reference or a reduced
    precision below its gate (unless forced)."""
    from kiln.exporter.validate import describe_failure

    where = f" The failed artifact is kept at {Path(output)}.failed." if opts.keep_failed else ""
    if not report["passed"]:
        raise ValidationError(f"Validation {'of ' + title if title else ''}failed: {describe_failure(report)}."
                              f"{where}", report)
    if accuracy is not None and not accuracy["passed"] and not opts.force_precision:
        gates = accuracy.get("gates") or {next(iter(accuracy)): accuracy["gate"]}  # several for encoder-decoders
        below = "; ".join(f"{metric} {accuracy[metric]:.4f} < {gate}" for metric, gate in gates.items()
                          if accuracy[metric] < gate)
        raise ValidationError(f"{opts.precision} is below its accuracy gate: {below} against the fp32 reference. "
                              f"Keep fp32, or pass --force-precision to write it anyway.{where}", accuracy)
