"""``kiln export --precision auto``: the fastest precision on this CPU whose accuracy gate passes, chosen by measuring.

Every candidate of the model's kind is exported (fp32, then the reduced ones, each through its accuracy gate against
the fp32 reference: decoders fp32 / int8 / int4, encoders fp32 / int8), the ones that pass are timed here, interleaved
round by round (decoders: ms per greedy decode step after a 32-token prompt, batch 1; encoders: one forward pass of
batch 1 at 128 tokens, or one image), and the fastest is written as the artifact. kiln.json's ``precision_auto``
records every candidate (passed or not, its gate's figures, its timings), the machine and the choice, so a reader can
see what was measured where: the choice is this CPU's; another CPU (AVX2 vs AVX-512 VNNI) may choose differently.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kiln.errors import ExportError, InputError, ValidationError

CANDIDATES = {"decoder": ("fp32", "int8", "int4"), "encoder": ("fp32", "int8")}
ROUNDS, WARMUP, PROMPT, STEPS, SEQUENCE = 7, 1, 32, 16, 128


def choose(candidates: dict) -> str:
    """``{precision: {"passed": bool, "ms": float | None}}`` (in order of preference: wider first) -> the fastest that
    passed its gate; an exact tie goes to the earlier (wider) one."""
    timed = [(record["ms"], i, precision) for i, (precision, record) in enumerate(candidates.items())
             if record.get("passed") and record.get("ms") is not None]
    if not timed:
        raise ExportError("--precision auto: no candidate passed its accuracy gate and was timed.")
    return min(timed)[2]


def export_auto(model, output, task: str, **options) -> dict:
    """Export every candidate precision, time those that pass, write the fastest to ``output``; returns its
    kiln.json (with ``precision_auto``)."""
    from kiln.artifact import atomic_directory, load_manifest, write_manifest
    from kiln.exporter.export import ExportOptions, export, resolve
    from kiln.exporter.specs import COMPANIONS

    if options.get("force_precision"):
        raise InputError("--precision auto picks among the precisions that pass their gate; --force-precision "
                         "would let one below it win. Drop one of the two.")
    opts = ExportOptions(task=task, **{**options, "precision": "fp32"})
    source = resolve(model, opts)
    if source.arch.spec in COMPANIONS:
        raise InputError(f"--precision auto is not measured for encoder-decoder artifacts ({source.raw['model_type']}) "
                         "yet: Whisper's measured CPU choice is int8 (docs/speech.md); pass --precision int8.")
    kind = "decoder" if source.arch.spec == "decoder" else "encoder"
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.auto-", dir=output.parent))
    try:
        records, manifests = {}, {}
        for precision in CANDIDATES[kind]:
            try:
                manifests[precision] = export(model, work / precision, task, **{**options, "precision": precision})
                records[precision] = {"passed": True, "accuracy": manifests[precision].get("accuracy")}
            except ValidationError as err:
                if precision == "fp32":
                    raise
                records[precision] = {"passed": False, "reason": str(err)[:500]}
        timings = measure({p: work / p for p in manifests}, kind)
        for precision, timing in timings.items():
            records[precision].update(timing)
        chosen = choose(records)
        manifest = manifests[chosen]
        manifest["precision_auto"] = {"chosen": chosen, "metric": timings[chosen]["metric"],
                                      "machine": _machine(), "candidates": records}
        with atomic_directory(output, overwrite=opts.force) as tmp:
            shutil.copytree(work / chosen, tmp, dirs_exist_ok=True)
            write_manifest(tmp, manifest)  # kiln.json is not among the hashed files
        return load_manifest(output)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(artifacts: dict, kind: str) -> dict:
    """Each artifact's time on this machine, the candidates interleaved round by round: {precision: {"ms", "metric",
    (decoders) "prefill_ms"}} with the medians."""
    from kiln.files import read_json
    from kiln.runtime.engines.select import open_engine
    from kiln.runtime.generate import DecoderSession
    from kiln.runtime.measure import Feeds

    runners, samples, engines = {}, {}, []
    for precision, path in artifacts.items():
        manifest = read_json(path / "kiln.json", "Re-export.")
        feeds = Feeds(manifest, read_json(path / "config.json", "Re-export."))
        engine = open_engine(path, spinning=False)
        engines.append(engine)
        if kind == "decoder":
            runners[precision] = _decode_runner(DecoderSession(engine), feeds(1, PROMPT))
        else:
            seq = min(SEQUENCE, feeds.limit("sequence") or SEQUENCE)
            feed = feeds(1, seq)
            runners[precision] = lambda engine=engine, feed=feed: {"ms": _seconds(lambda: engine.run(feed)) * 1000}
        samples[precision] = []
    names = list(runners)
    try:
        for r in range(WARMUP + ROUNDS):
            for name in names[r % len(names):] + names[:r % len(names)]:
                result = runners[name]()
                if r >= WARMUP:
                    samples[name].append(result)
    finally:
        for engine in engines:
            engine.close()
    out = {}
    for name, results in samples.items():
        out[name] = {key: round(statistics.median(r[key] for r in results), 3) for key in results[0]}
        out[name]["metric"] = (f"ms per decode step after a {PROMPT}-token prompt, batch 1" if kind == "decoder"
                               else f"ms per forward pass, batch 1, {SEQUENCE} tokens (or one image)")
    return out


def _decode_runner(session, feed: dict):
    def run() -> dict:
        ids, mask = feed["input_ids"], feed["attention_mask"]
        started = time.perf_counter()
        logits, cache = session.step(ids, mask, feed["position_ids"], session.empty_cache(1))
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for k in range(STEPS):
            token = np.array([[int(logits[0].argmax())]], dtype=np.int64)
            mask = np.ones((1, PROMPT + k + 1), dtype=np.int64)
            logits, cache = session.step(token, mask, np.array([[PROMPT + k]], dtype=np.int64), cache)
        decode = (time.perf_counter() - started) / STEPS
        session.release()
        return {"ms": decode * 1000, "prefill_ms": prefill * 1000}

    return run


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _machine() -> dict:
    """The CPU and its widest vector instructions (what decides between the int8 and int4 kernels)."""
    from kiln.runtime.measure import machine

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "unknown"
    return {**machine(None), "isa": isa}
