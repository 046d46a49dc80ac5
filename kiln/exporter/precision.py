"""Reduced precision: int8/int4 through onnxruntime's own quantization tools (CPU deployment), fp16/bf16 through the
typed-graph pass ``passes/half.py`` (GPUs and TensorRT; onnxruntime's CPU provider runs fp16 but not bf16), and the
accuracy gate that decides whether the result may ship.

- ``int8`` for encoders: dynamic quantization, per-channel weights of every MatMul/Gemm in 7 bits (``reduce_range``:
  CPUs without VNNI saturate on full-range weights, see ``_dynamic_int8``; activations quantized at run time), and
  int8 embedding tables (Gather): all-MiniLM-L6-v2 shrinks from 87 to 23 MB at mean cosine 0.9915 on every CPU (full
  range: 0.9931 with VNNI, 0.9916 without).
  The fused ``Attention`` nodes stay fp32: onnxruntime's quantizer would otherwise mistake the standard ``Attention``
  op for its contrib op of the same name and emit an invalid ``QAttention``.
- ``int8`` / ``int4`` for decoders (``weight_only``): MatMul weights blockwise (32, asymmetric) in com.microsoft
  ``MatMulNBits``, whose kernel (accuracy_level 4) quantizes activations per block of 32 too; embedding tables int8 as
  above. A decode step is bound by reading weights, and per-tensor activation scales (dynamic int8) lose LLaMA's MLP
  outliers: SmolLM2-135M's teacher-forced next-token agreement is 0.93 weight-only int8 against 0.53 dynamic (the
  down projection alone takes it to 0.80 when left fp32), at the same decode speed. The price, on a CPU without VNNI:
  prefill at about 2x the dynamic int8 time (116 vs 58 ms for 32 tokens: onnxruntime's 8-bit blockwise kernel is
  slower than its u8 x s8 GEMM there).
- ``fp16`` / ``bf16``: weights and safe arithmetic in half precision, normalisations, Softmax and reductions in
  fp32, graph inputs and outputs fp32 (see ``passes/half.py``).

A graph whose weights live beside it (``model.onnx.data``: the tracers write those above 1.5 GB, near protobuf's 2 GB
limit) gives reduced graphs written the same way, each intermediate file too (``kiln.artifact.weights_file``).

Whether the result is good enough is measured by :func:`accuracy` against the fp32 reference on real text, with the
validator's task metrics (``validate.TASK_CHECKS``) averaged and a gate per metric; the exporter refuses a precision
below its gate unless forced. A bf16 graph cannot run on the CPU here, so its accuracy is measured on
:func:`accuracy_model`: the same graph simulated in fp32 with every half-precision value rounded to bf16.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from kiln.artifact import MODEL_FILE, weights_file

log = logging.getLogger("kiln")
# Short, varied English: what the accuracy gate embeds or continues.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating a piece of bread in the kitchen.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "The patient was given antibiotics and recovered within a week.",
    "I absolutely loved this movie, the acting was brilliant!",
    "This is the worst service I have ever experienced.",
    "Paris is the capital and most populous city of France.",
    "def add(a, b):\n    return a + b",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The meeting has been moved to Thursday afternoon at three o'clock.",
    "She plays the violin in the city orchestra every weekend.",
    "Two men pushed carts through the woods.",
]
# Decoders are gated loosely: teacher-forced top-1 agreement of a small model flips at near-ties (SmolLM2-135M: 0.93
# with weight-only int8, 0.53 with int4, LM head included), so the gate only catches a broken quantization; the figure
# is recorded for the user to judge.
GATES = {"mean_cosine": 0.99, "label_agreement": 0.99, "token_agreement": 0.99, "span_agreement": 0.99,
         "next_token_agreement": 0.5}


def reduce_precision(reference, spec, directory: Path, precision: str) -> tuple[dict, Counter]:
    """Replace ``directory``'s model.onnx by its ``precision`` version; returns (accuracy figures, op counts of the
    new graph)."""
    import onnx

    fp32, reduced = directory / MODEL_FILE, directory / f"model.{precision}.onnx"
    kept = quantize(fp32, reduced, precision, weight_only=spec.task == "text-generation")
    measured = accuracy_model(fp32, reduced, precision)  # bf16: an fp32 simulation, since the CPU cannot run it
    figures = accuracy(reference, spec, measured, directory)
    if kept:
        figures["exact_block_weights"] = kept  # weights stored with the checkpoint's own blocks (passes/exact_blocks.py)
    if measured != reduced:
        figures["measured_on"] = f"fp32 simulation of {precision} (values rounded to {precision} where the graph has them)"
        remove_graph(measured)
    replace_graph(reduced, fp32)
    ops = Counter(node.op_type for node in onnx.load(str(fp32), load_external_data=False).graph.node)
    log.info("      %s", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    return figures, ops


def reduce_encoder_decoder_precision(runners: dict, specs: dict, directory: Path, files: dict,
                                     precision: str) -> tuple[dict, dict]:
    """An encoder-decoder's two graphs (``files``: {"encoder": name, "decoder": name} in ``directory``) at
    ``precision``: the encoder as encoders are (int8: dynamic, activations quantized at run time; it is bound by
    arithmetic over 1500 positions), the decoder as decoders are (int8: weight-only blockwise; a step is bound by
    reading weights, the tied LM head most). On OpenAI's tiny.en this takes the encoder from 301 to 223 ms per 30 s
    window and a decode step from 10.3 to 5.2 ms on a 2-core Zen 3, greedy text unchanged on jfk.flac; dynamic int8 in
    the decoder too was no faster (5.1 ms) and changed the text. Returns (accuracy figures, op counts per graph).

    The gate runs the reduced pair end to end against the fp32 reference (``speech_accuracy``)."""
    if precision not in ("int8", "fp16"):
        raise ValueError(f"{precision} is not measured for encoder-decoder artifacts")
    return _reduce_graphs(directory, files, precision, {"decoder": True},
                          lambda reduced: speech_accuracy(runners, specs["decoder"], reduced, directory))


def reduce_dual_encoder_precision(runners: dict, specs: dict, directory: Path, files: dict,
                                  precision: str) -> tuple[dict, dict]:
    """An image + text dual encoder's two graphs at ``precision``, both as encoders are (int8: dynamic), gated on
    the cosine of each tower's embeddings against the fp32 reference (0.99, as encoders) on SENTENCES and synthetic
    images; the zero-shot top-1 agreement (each image's best sentence) is recorded beside them."""
    if precision not in ("int8", "fp16"):
        raise ValueError(f"{precision} is not measured for image + text artifacts")
    return _reduce_graphs(directory, files, precision, {},
                          lambda reduced: dual_encoder_accuracy(runners, specs, reduced, directory))


def _reduce_graphs(directory: Path, files: dict, precision: str, weight_only: dict, measure) -> tuple[dict, dict]:
    """Each graph of ``files`` ({name: file in ``directory``}) reduced to ``precision`` (``weight_only`` per name),
    ``measure(reduced paths)`` -> accuracy figures, then the reduced graphs in place of the fp32 ones (whatever the
    figures say: the exporter refuses a failed gate by not writing the artifact). Returns (figures, ops per graph)."""
    import onnx

    reduced = {}
    try:
        for name in files:
            src = directory / files[name]
            reduced[name] = src.with_name(f"{src.stem}.{precision}.onnx")
            quantize(src, reduced[name], precision, weight_only=weight_only.get(name, False))
        figures = measure(reduced)
        for name in files:
            replace_graph(reduced[name], directory / files[name])
    finally:
        for path in reduced.values():
            remove_graph(path)
    ops = {name: Counter(node.op_type for node in onnx.load(str(directory / files[name]),
                                                            load_external_data=False).graph.node) for name in files}
    log.info("      %s", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
                                   if k != "gates"))
    return figures, ops


def gate_images(spec, directory: Path, count: int = 8) -> np.ndarray:
    """(count, Ch, H, W) pixel values of synthetic images (gradients, stripes, discs in a few colours) through the
    artifact's image processor when it has one and Pillow is installed, else random normal values."""
    (_, channels, height, width) = spec.inputs[0].axes
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height * 2, 0:width * 2] / (2 * max(height, width))
    images = []
    for i in range(count):
        colour = rng.uniform(0, 255, 3)
        base = {0: x, 1: y, 2: np.sin(12 * x) * 0.5 + 0.5, 3: ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1)}[i % 4]
        image = base[..., None] * colour + (1 - base[..., None]) * rng.uniform(0, 255, 3)
        images.append(np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8))
    try:
        from kiln.runtime.image_processor import ImageProcessor

        return ImageProcessor.from_dir(directory)(images).pixel_values
    except Exception:  # noqa: BLE001 - no processor config or no Pillow: the spec's own random inputs
        return spec.make_feed({"batch": count}, rng)["pixel_values"]


def dual_encoder_accuracy(runners: dict, specs: dict, graphs: dict, directory: Path) -> dict:
    from kiln.exporter.validate import TASK_CHECKS
    from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

    text_feed = gate_feed(specs["text"], directory)
    image_feed = {"pixel_values": gate_images(specs["vision"], directory)}
    ref_text, got_text = runners["text"](text_feed), OnnxRuntimeEngine(graphs["text"]).run(text_feed)
    ref_image, got_image = runners["vision"](image_feed), OnnxRuntimeEngine(graphs["vision"]).run(image_feed)
    text_cos = float(np.mean(TASK_CHECKS["text-embeddings"].values(ref_text, got_text, text_feed)))
    image_cos = float(np.mean(TASK_CHECKS["image-embeddings"].values(ref_image, got_image, image_feed)))

    def best_sentence(images, texts):
        a = images / np.linalg.norm(images, axis=-1, keepdims=True)
        b = texts / np.linalg.norm(texts, axis=-1, keepdims=True)
        return (a @ b.T).argmax(-1)

    agreement = float(np.mean(best_sentence(ref_image["image_embeds"], ref_text["text_embeds"])
                              == best_sentence(got_image["image_embeds"], got_text["text_embeds"])))
    gates = {"text_mean_cosine": GATES["mean_cosine"], "image_mean_cosine": GATES["mean_cosine"]}
    return {"mean_cosine": min(text_cos, image_cos), "gate": GATES["mean_cosine"],
            "passed": text_cos >= gates["text_mean_cosine"] and image_cos >= gates["image_mean_cosine"],
            "inputs": len(next(iter(text_feed.values()))), "text_mean_cosine": text_cos, "image_mean_cosine": image_cos,
            "zero_shot_top1_agreement": agreement, "gates": gates,
            "measured_on": f"SENTENCES (text), {len(image_feed['pixel_values'])} synthetic images (vision); top-1: "
                           "each image's best sentence"}


def gate_speech(directory: Path, mel_bins: int, frames: int) -> np.ndarray:
    """(1, mel bins, frames) log-mel features of 10 s of synthetic voiced sound (a harmonic series on a gliding pitch,
    amplitude-modulated at a syllable rate, a little noise), through the artifact's own feature extractor: inputs in
    the range and structure the encoder was trained on, without shipping a recording."""
    from kiln.runtime.audio import WhisperFeatureExtractor

    config = Path(directory) / "preprocessor_config.json"
    extractor = (WhisperFeatureExtractor.from_dir(directory) if config.is_file()
                 else WhisperFeatureExtractor({"feature_size": mel_bins}))
    rate = extractor.sampling_rate
    t = np.arange(10 * rate) / rate
    pitch = 130 + 40 * np.sin(2 * np.pi * 0.4 * t) + 20 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 24))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.5 * t) ** 2
    noise = np.random.default_rng(0).standard_normal(len(t)) * 0.02
    audio = (0.1 * voice * envelope + noise).astype(np.float32)
    features = extractor([audio])["input_features"]
    if features.shape[1:] != (mel_bins, frames):
        raise ValueError(f"the feature extractor gives {features.shape[1:]}, the encoder takes ({mel_bins}, {frames})")
    return features


def speech_accuracy(runners: dict, decoder_spec, graphs: dict, directory: Path) -> dict:
    """The reduced encoder-decoder against the fp32 reference, each side end to end on the same synthetic speech
    (``gate_speech``): the encoder's hidden states (mean cosine, gate 0.99 as encoders), and the decoder's
    teacher-forced next-token agreement over ``SENTENCES`` after Whisper's prompt, each side's decoder attending to
    its own encoder's keys and values (gate as decoders)."""
    import json

    from kiln.exporter.validate import TASK_CHECKS
    from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine
    from kiln.runtime.generate.whisper import WhisperDecoding

    encoder, decoder = OnnxRuntimeEngine(graphs["encoder"]), OnnxRuntimeEngine(graphs["decoder"])
    cross = [t.name for t in decoder_spec.inputs if t.name.startswith("cross_key_values.")]
    features_shape = next(t for t in encoder.inputs() if t.name == "input_features").shape
    features = gate_speech(directory, int(features_shape[1]), int(features_shape[2]))
    ref_audio, got_audio = runners["encoder"]({"input_features": features}), encoder.run({"input_features": features})
    cosine = float(np.mean(TASK_CHECKS["speech-encoder"].values(ref_audio, got_audio, {})))

    rules = WhisperDecoding.from_dict(json.loads((Path(directory) / "generation_config.json").read_text()))
    english = rules.language_id("en") if rules.multilingual else None
    prompt = rules.prompt(english, "transcribe" if rules.task_to_id else None, timestamps=False)
    rows = _gate_token_rows(directory, rules.eos_token_id, decoder_spec.axes["sequence"].max - len(prompt))
    agree = []
    for row in rows:
        ids = np.array([prompt + row], dtype=np.int64)
        feed = decoder_spec.make_feed({"batch": 1, "sequence": ids.shape[1], "past_sequence": 0},
                                      np.random.default_rng(0))
        feed.update(input_ids=ids, attention_mask=np.ones_like(ids),
                    position_ids=np.arange(ids.shape[1], dtype=np.int64)[None])
        ref = runners["decoder"]({**feed, **{name: ref_audio[name] for name in cross}})["logits"]
        got = decoder.run({**feed, **{name: got_audio[name] for name in cross}})["logits"]
        positions = slice(len(prompt) - 1, ids.shape[1] - 1)  # the steps that predict the sentence's tokens
        agree.extend(ref[0, positions].argmax(-1) == got[0, positions].argmax(-1))
    agreement = float(np.mean(agree))
    gates = {"next_token_agreement": GATES["next_token_agreement"], "encoder_mean_cosine": GATES["mean_cosine"]}
    return {"next_token_agreement": agreement, "gate": gates["next_token_agreement"],
            "passed": agreement >= gates["next_token_agreement"] and cosine >= gates["encoder_mean_cosine"],
            "inputs": len(rows), "encoder_mean_cosine": cosine, "gates": gates,
            "measured_on": "10 s of synthetic voiced sound (encoder); SENTENCES teacher-forced (decoder)"}


def _gate_token_rows(directory: Path, eos: int, room: int) -> list[list[int]]:
    """SENTENCES as the artifact's tokenizer encodes them (a space before each, as Whisper writes words), cut to the
    decoder's room; random text ids below end-of-text when there is no tokenizer."""
    if (Path(directory) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
        rows = [tokenizer.encode(" " + text, add_special_tokens=False).ids[:room] for text in SENTENCES]
    else:
        rng = np.random.default_rng(0)
        rows = [rng.integers(0, eos, min(16, room)).tolist() for _ in SENTENCES]
    return [row for row in rows if row]


def external(graph: Path) -> bool:
    """Whether ``graph`` keeps its weights in a file beside it; graphs derived from it are written the same way."""
    return weights_file(graph).is_file()


def remove_graph(graph: Path) -> None:
    graph.unlink(missing_ok=True)
    weights_file(graph).unlink(missing_ok=True)


def quantize(src: Path, dst: Path, precision: str, weight_only: bool = False) -> dict:
    """Write ``src`` at ``precision`` to ``dst``; ``weight_only`` (decoders) stores int8 weights blockwise as int4 does.
    Returns how many weights kept the blocks they already were, by bits (int4/int8 weight-only: a GGUF's Q4_0/Q8_0
    tensors, ``passes/exact_blocks.py``); onnxruntime's quantizer quantizes the others."""
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401 (creates its loggers, silenced below)

    # onnxruntime's quantizers log advice on the root logger and one INFO line per node on their own loggers.
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                                      if name.startswith("onnxruntime.quantization"))]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    folded, kept = dst.with_name(dst.stem + ".folded.onnx"), {}
    try:
        if precision in ("int8", "int4"):
            changed, kept = _prepare_weights(src, folded, exact=weight_only)
            src = folded if changed else src
        _quantize(src, dst, precision, weight_only)
        return kept
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        remove_graph(folded)


def _prepare_weights(src: Path, dst: Path, exact: bool) -> tuple[bool, dict]:
    """Before the quantizers: a tied LM head's ``MatMul(x, Transpose(W))`` with W stored transposed, so they see a
    constant weight (``passes/transpose_weights.py``); with ``exact``, the weights that already are blocks of 4 or 8
    bits as MatMulNBits with those blocks (``passes/exact_blocks.py``). Writes ``dst`` only when something changed;
    returns (changed, weights kept as blocks by bits, e.g. {"4-bit": 120, "8-bit": 1})."""
    import onnx_ir as ir

    from kiln.exporter.passes.exact_blocks import ExactBlocks
    from kiln.exporter.passes.transpose_weights import fold_weight_transposes

    model = ir.load(str(src))
    changed = bool(fold_weight_transposes(model))
    kept = dict(ExactBlocks()(model).details) if exact else {}
    if kept:
        log.info("      weights that keep the checkpoint's own blocks: %s", kept)
    if changed or kept:
        _save(model, dst, external(src))
    return bool(changed or kept), kept


def _quantize(src: Path, dst: Path, precision: str, weight_only: bool = False) -> None:
    if precision in ("fp16", "bf16"):
        _half(src, dst, precision)
    elif precision == "int8" and not weight_only:
        attention = _attention_ops(src)
        # com.microsoft.Attention is quantized with its projection (QAttention); a decomposed attention's two
        # activation products too (both inputs dynamic), as Optimum does. A standard ONNX Attention node stays fp32:
        # the quantizer would take it for the contrib op of the same name.
        _dynamic_int8(src, dst, ["MatMul", "Gemm", "Gather", *(["Attention"] if attention == "contrib" else [])],
                      const_weights_only=attention != "decomposed")
    elif precision in ("int8", "int4"):
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        blockwise = dst.with_name(dst.stem + ".blockwise.onnx")
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=False, accuracy_level=4,
                                         bits=8 if precision == "int8" else 4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(blockwise), use_external_data_format=external(src))
        try:
            _dynamic_int8(blockwise, dst, ["Gather"])  # the embedding tables
        finally:
            remove_graph(blockwise)
    else:
        raise ValueError(f"unknown precision {precision!r}")


def _dynamic_int8(src: Path, dst: Path, op_types: list[str], const_weights_only: bool = True) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # reduce_range: 7-bit weights. Without VNNI (AVX2, AVX-512 before Cascade Lake) onnxruntime's u8 x s8 kernel
    # adds pairs of products in int16 (vpmaddubsw), which saturates on full-range weights: SmolLM2 quantized this way
    # (decoders are weight-only now) agreed 0.0 with fp32 on a Zen 3, 0.53 with reduce_range (0.54 full-range on a
    # VNNI Zen 4). The artifact may run on either kind of CPU, so it is built for both.
    quantize_dynamic(str(src), str(dst), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=op_types, extra_options={"MatMulConstBOnly": const_weights_only},
                     use_external_data_format=external(src))


def _attention_ops(path: Path) -> str:
    """``contrib`` when the graph's attention is onnxruntime's com.microsoft.Attention only (its projection is then
    quantized too, as QAttention), ``decomposed`` when there is no Attention node at all, else ``onnx``."""
    import onnx

    ops = {(n.domain or "", n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node}
    if ("", "Attention") in ops or ("com.microsoft", "MultiHeadAttention") in ops:
        return "onnx"  # an op the quantizer leaves alone; the projections are MatMuls with constant weights
    return "contrib" if ("com.microsoft", "Attention") in ops else "decomposed"


def _half(src: Path, dst: Path, precision: str, simulate: bool = False) -> None:
    import onnx_ir as ir

    from kiln.exporter.passes.half import HalfPrecision

    model = ir.load(str(src))
    HalfPrecision(precision, simulate=simulate)(model)
    _save(model, dst, external(src))


def _save(model, dst: Path, external_weights: bool) -> None:
    """Write an onnx_ir ``model`` to ``dst``, its weights to ``weights_file(dst)`` when ``external_weights``."""
    import onnx_ir as ir

    ir.save(model, str(dst), external_data=weights_file(dst).name if external_weights else None)


def replace_graph(src: Path, dst: Path) -> None:
    """Move graph ``src`` to ``dst``, the artifact's model file: an inline graph by rename (and the old graph's
    weights file goes with the old graph); one with a weights file is written again so that its tensors point at
    ``weights_file(dst)``, the name the artifact format gives it."""
    import onnx_ir as ir

    if not external(src):
        os.replace(src, dst)
        weights_file(dst).unlink(missing_ok=True)
        return
    _save(ir.load(str(src)), dst, True)  # reads src's weights file, writes dst's
    remove_graph(src)


def accuracy_model(src: Path, reduced: Path, precision: str) -> Path:
    """The graph whose outputs stand for ``precision`` on this machine: the reduced graph itself, except bf16 (which
    onnxruntime's CPU provider cannot run): its fp32 simulation, written beside ``reduced``."""
    if precision != "bf16":
        return reduced
    simulated = reduced.with_name(reduced.stem + ".simulated.onnx")
    _half(src, simulated, precision, simulate=True)
    return simulated


def accuracy(reference, spec, onnx_path: Path, tokenizer_dir: Path) -> dict:
    """The precision's agreement with the fp32 reference on ``SENTENCES`` (tokenized with the artifact's tokenizer,
    or random tokens when it has none): the task's metric (the validator's, averaged) and its gate."""
    from kiln.exporter.validate import TASK_CHECKS
    from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(onnx_path)
    feed = gate_feed(spec, tokenizer_dir)
    got = engine.run(feed)
    ref = reference(feed)  # run(feed) -> {output name: array}, as in the validator
    check = TASK_CHECKS[spec.task]
    values = np.asarray(check.values(ref, got, feed), dtype=np.float64).ravel()
    metric, value = check.accuracy_name, float(values.mean())
    # The gate is on the mean over the sentences (how embedding quality is usually reported); the worst is kept.
    extra = {"min_cosine": float(values.min())} if check.worst else {}
    rows = len(next(iter(feed.values())))  # SENTENCES, or random token rows when the artifact has no tokenizer
    return {metric: value, "gate": GATES[metric], "passed": value >= GATES[metric], "inputs": rows, **extra}


def gate_feed(spec, tokenizer_dir: Path) -> dict:
    """The gate's inputs: SENTENCES tokenized with the artifact's tokenizer, or random tokens when it has none."""
    from kiln.runtime.generate import position_ids
    from kiln.runtime.tokenizer import Tokenizer

    names = [t.name for t in spec.inputs]
    if (Path(tokenizer_dir) / "tokenizer.json").is_file() and "pixel_values" not in names:
        batch = Tokenizer.from_dir(tokenizer_dir, max_length=spec.axes["sequence"].max)(
            SENTENCES, padding_side="left" if spec.task == "text-generation" else None)
        feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "token_type_ids": batch.token_type_ids}
        if spec.task == "text-generation":
            feed["position_ids"] = position_ids(batch.attention_mask)
            empty = spec.make_feed({"batch": len(SENTENCES), "sequence": 1, "past_sequence": 0}, np.random.default_rng(0))
            feed.update({k: v for k, v in empty.items() if k.startswith("past_key_values.")})
        return {name: feed[name] for name in names}
    sizes = {name: r.clamp(16) for name, r in spec.axes.items()}
    sizes.update({k: 0 for k in sizes if k == "past_sequence"})
    return spec.make_feed(sizes, np.random.default_rng(0))
