"""Which encoder attention form onnxruntime's CPU provider runs fastest, at fp32 and int8: the measurement behind
kiln's default (``kiln/exporter/passes/attention_forms.py``).

For all-MiniLM-L6-v2 (real weights) and a random-init BERT-base, the kiln fp32 export is rewritten into each form
(``onnx`` as traced, ``onnx-3d``, ``onnx-packed``, ``contrib``, ``contrib-mha``, ``decomposed``), each checked against
the traced graph on a padded batch, then quantized the way ``--precision int8`` does (dynamic, per-channel int8
weights; with ``contrib`` the attention's own projection is quantized too, as onnxruntime's ``QAttention``). All graphs of a model are timed
interleaved, 2 threads, on batch 1 / sequence 16, batch 1 / 128 and batch 8 / 128.

    .venv/bin/python benchmarks/bench_attention_forms.py --write --artifacts /tmp/bench-forms
    .venv/bin/python benchmarks/bench_attention_forms.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoders import DEFAULT_OUTPUT, MODELS, export_once, machine_info, versions, write_section  # noqa: E402

from kiln.exporter.passes.attention_forms import FORMS, EncoderAttention  # noqa: E402
from kiln.exporter.precision import quantize  # noqa: E402
from kiln.runtime.engines.onnxruntime import CPU_DISABLED_OPTIMIZERS  # noqa: E402

THREADS = 2
SHAPES = ((1, 16), (1, 128), (8, 128))
WARMUP = 3
SECTION = "## Attention forms: which one onnxruntime CPU runs fastest"


def build_graphs(fp32: Path, workdir: Path) -> dict[tuple[str, str], Path]:
    graphs = {}
    for form in FORMS:
        path = workdir / f"{form}.fp32.onnx"
        if not path.is_file():
            model = ir.load(str(fp32))
            skipped = sum(EncoderAttention(form)(model).skipped.values()) if form != "onnx" else 0
            if skipped:
                raise SystemExit(f"{form}: {skipped} layer(s) not rewritten; the source must be the traced form")
            ir.save(model, str(path))
        graphs[form, "fp32"] = path
        int8 = workdir / f"{form}.int8.onnx"
        if not int8.is_file():
            quantize(path, int8, "int8")
        graphs[form, "int8"] = int8
    return graphs


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    # Spin-waiting off: an idle session's polling threads would steal the cores of the next graph in the round.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # As kiln's runtime opens them (kiln.runtime.engines.onnxruntime).
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))


def feed_for(session: ort.InferenceSession, batch: int, seq: int, padded: bool = False) -> dict:
    rng = np.random.default_rng(batch * 1000 + seq)
    mask = np.ones((batch, seq), np.int64)
    if padded and batch > 1:
        mask[1:, seq // 2:] = 0
    feed = {"input_ids": rng.integers(1000, 20000, (batch, seq)), "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), np.int64)}
    return {i.name: feed[i.name] for i in session.get_inputs()}


def check(sessions: dict) -> dict[tuple[str, str], float]:
    """Max difference of each graph's last_hidden_state from the traced fp32 graph's, on a padded batch."""
    ref_session = sessions["onnx", "fp32"]
    feed = feed_for(ref_session, 4, 37, padded=True)
    valid = feed["attention_mask"].astype(bool)
    ref = ref_session.run(None, feed)[0]
    diffs = {}
    for key, s in sessions.items():
        diffs[key] = float(np.abs(s.run(None, feed)[0] - ref)[valid].max())
        if key[1] == "fp32" and diffs[key] > 1e-4:
            raise AssertionError(f"{key} differs from the traced graph by {diffs[key]}")
    return diffs


def time_shape(sessions: dict, batch: int, seq: int, rounds: int) -> dict:
    feeds = {key: feed_for(s, batch, seq) for key, s in sessions.items()}
    for key, s in sessions.items():
        for _ in range(WARMUP):
            s.run(None, feeds[key])
    times = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, s in sessions.items():
            started = time.perf_counter()
            s.run(None, feeds[key])
            times[key].append(time.perf_counter() - started)
    return {key: float(np.median(t)) * 1000 for key, t in times.items()}


def table(name: str, results: dict, diffs: dict) -> list[str]:
    header = "| precision | form | " + " | ".join(f"b{b} s{s} ms" for b, s in SHAPES) + " | vs traced (b1 s128) | max diff vs fp32 traced |"
    lines = [f"**{name}**", "", header, "|" + "---|" * (len(SHAPES) + 4)]
    for precision in ("fp32", "int8"):
        base = results[(1, 128)][("onnx", precision)]
        best = {shape: min(v for k, v in results[shape].items() if k[1] == precision) for shape in SHAPES}
        for form in FORMS:
            key = (form, precision)
            cells = [(f"**{results[s][key]:.2f}**" if results[s][key] == best[s] else f"{results[s][key]:.2f}")
                     for s in SHAPES]
            lines.append(f"| {precision} | {form} | " + " | ".join(cells)
                         + f" | {base / results[(1, 128)][key]:.2f}x | {diffs[key]:.1e} |")
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per shape (default 20)")
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--artifacts", type=Path, default=None, help="keep/reuse exports and graphs in DIR/<model>")
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 20)
    command = shlex.join([".venv/bin/python", *(sys.argv if argv is None else ["benchmarks/bench_attention_forms.py", *argv])])
    machine = machine_info()
    root = args.artifacts or Path(tempfile.mkdtemp(prefix="kiln-forms-"))
    out = [SECTION, "", f"Command: `{command}`", "",
           f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "", "Machine:", *machine, "",
           f"Versions: {versions()}", "",
           f"Setup: onnxruntime CPU, {THREADS} intra-op threads (spin-waiting off, so interleaved sessions do not steal "
           f"each other's cores), {rounds} interleaved rounds after {WARMUP} warm-ups, "
           "medians in ms; bold = fastest form at that precision and shape. int8 = dynamic per-channel int8 weights "
           "(`--precision int8`); with `contrib` onnxruntime's quantizer also quantizes the attention's projection "
           "(QAttention).", ""]
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        name, make_checkpoint = MODELS[model]
        workdir = root / model
        workdir.mkdir(parents=True, exist_ok=True)
        fp32 = export_once(make_checkpoint(workdir), workdir / "traced", attention="onnx")  # the forms' common source
        sessions = {key: session(path) for key, path in build_graphs(fp32, workdir).items()}
        diffs = check(sessions)
        results = {}
        for batch, seq in SHAPES:
            results[(batch, seq)] = time_shape(sessions, batch, seq, rounds)
            print(name, batch, seq, {f"{k[0]}/{k[1]}": round(v, 2) for k, v in results[(batch, seq)].items()},
                  file=sys.stderr, flush=True)
        out += table(name, results, diffs)
    out.append(f"Load average at the end: {machine[-1].split(': ', 1)[1]} (start) -> see machine line above.")
    text = "\n".join(out[:-1]) + "\n"
    print(text)
    if args.write:
        write_section(args.output, text, heading=SECTION)


if __name__ == "__main__":
    main()
