"""New encoders: kiln fp32/int8 vs Optimum fp32/int8 vs transformers eager on CLIP, SigLIP, DeBERTa-v3 and ModernBERT.

Models, seeded random init at the public checkpoints' shapes (random weights time the same as trained ones):
- ``clip-b32``: CLIP ViT-B/32 (``transformers.CLIPConfig()`` defaults: text 512 wide x 12 layers, vision 768 wide x 12
  layers, patch 32, 224 px, projection 512); image embeddings at batch 1 and 32, text embeddings (77 tokens) at 1, 32;
- ``siglip-base``: SigLIP base patch16 224 (``transformers.SiglipConfig()`` defaults); the same four shapes, text at
  64 tokens (SigLIP's padded prompt length);
- ``deberta-v3-base``: DeBERTa-v3-base's config (768 x 12 layers, vocabulary 128100, relative attention p2c|c2p with
  256 position buckets, no token types), 3-label classifier; batch 1 and 8 at sequence 128;
- ``modernbert-base``: ``transformers.ModernBertConfig()`` defaults, 3-label classifier; batch 1 and 8 at 128.

Runners, every one on the same random inputs (token ids; normal pixel values), 2 threads each, spin-waiting off:
- ``kiln fp32`` / ``kiln int8``: ``kiln.export(..., precision=..., batch="1:32")`` (CLIP/SigLIP: the
  zero-shot-image-classification artifact's ``text.onnx`` and ``vision.onnx``, each shape running one tower; int8
  with ``force_precision``, since a random model's accuracy gate measures nothing, its figures recorded) on kiln's
  ``OnnxRuntimeEngine(threads=2, spinning=False)``;
- ``Optimum fp32`` / ``Optimum int8``: exported in Optimum's own virtualenv (``.bench-venvs/optimum``, created when
  missing) by ``_optimum_encoders_worker.py`` (``main_export``; int8: ``ORTQuantizer`` with
  ``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)``). Optimum exports CLIP and SigLIP as one
  graph over both towers; the worker cuts each tower out of it (``onnx.utils.extract_model``, Optimum's nodes
  unchanged), so a text shape runs Optimum's text tower only. The files run in this venv's onnxruntime with kiln's
  engine's session options (``ORT_ENABLE_ALL``, intra-op 2 threads, inter-op 1, spinning off), without the
  optimizers kiln's engine turns off for its own graphs (``CPU_DISABLED_OPTIMIZERS``);
- ``transformers eager``: PyTorch eager (no torch.compile), ``attn_implementation="eager"``,
  ``torch.inference_mode()``, ``torch.set_num_threads(2)`` (``OMP_WAIT_POLICY=PASSIVE``).
Per model and shape: warm-up calls, then ``--rounds`` rounds of every runner, the order rotated each round; medians.
Each runner's output is compared with transformers' (cosine per row) on the same inputs.

    .venv/bin/python benchmarks/bench_new_encoders.py --workdir /tmp/bench-new --write       # all four, RESULTS.md
    .venv/bin/python benchmarks/bench_new_encoders.py --quick --models deberta-v3-base --workdir /tmp/bench-new
    .venv/bin/python benchmarks/bench_new_encoders.py --quick --tiny                         # the script's own check

``--quick``: 3 rounds, 1 warm-up, table only. ``--tiny``: 2-layer, 64-wide models of the same families (a minute;
the numbers mean nothing; ``--write`` only with ``--output`` elsewhere). Checkpoints and exports are kept and reused
in ``--workdir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spinning between runners

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
from bench_encoders import load_average, machine_info, versions, write_section  # noqa: E402

import kiln  # noqa: E402
from kiln.runtime.engines.onnxruntime import CPU_DISABLED_OPTIMIZERS, OnnxRuntimeEngine  # noqa: E402

THREADS = 2
SECTION = "## New encoders: CLIP, SigLIP, DeBERTa-v3, ModernBERT vs Optimum and transformers"
OPTIMUM_VENV = ROOT / ".bench-venvs" / "optimum"
OPTIMUM_PYTHON = OPTIMUM_VENV / "bin" / "python"
# torch pinned in the same pip command (else pip pulls CUDA's wheels); transformers pinned to what optimum supports
OPTIMUM_INSTALL = ("torch==2.13.0", "optimum-onnx[onnxruntime]", "transformers==4.57.6")
RUNNERS = ("kiln fp32", "kiln int8", "Optimum fp32", "Optimum int8", "transformers eager")
TOWERS = {"text": {"inputs": ["input_ids", "attention_mask"], "output": "text_embeds"},
          "vision": {"inputs": ["pixel_values"], "output": "image_embeds"}}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


# ------------------------------------------------------------------------------------------------------- models

@dataclass(frozen=True)
class Model:
    label: str
    task: str  # kiln's and Optimum's
    make: Callable[[bool], torch.nn.Module]  # tiny -> a seeded random-init transformers model
    shapes: tuple  # (kind, batch, seq): kind "image", "text" (a dual encoder's text tower) or "classify"

    @property
    def dual(self) -> bool:
        return self.task == "zero-shot-image-classification"


def make_clip(tiny: bool):
    config = (transformers.CLIPConfig(text_config=TINY, vision_config=TINY, projection_dim=32) if tiny
              else transformers.CLIPConfig())
    return transformers.CLIPModel(config)


def make_siglip(tiny: bool):
    config = transformers.SiglipConfig(text_config=TINY, vision_config=TINY) if tiny else transformers.SiglipConfig()
    return transformers.SiglipModel(config)


def make_deberta(tiny: bool):
    size = TINY if tiny else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    config = transformers.DebertaV2Config(
        **size, vocab_size=128100, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=256,
        max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
        type_vocab_size=0, layer_norm_eps=1e-7, num_labels=3)
    return transformers.DebertaV2ForSequenceClassification(config)


def make_modernbert(tiny: bool):
    config = (transformers.ModernBertConfig(**{**TINY, "num_hidden_layers": 3}, num_labels=3) if tiny
              else transformers.ModernBertConfig(num_labels=3))
    return transformers.ModernBertForSequenceClassification(config)


def dual_shapes(seq: int) -> tuple:
    return (("image", 1, 0), ("image", 32, 0), ("text", 1, seq), ("text", 32, seq))


MODELS = {
    "clip-b32": Model("CLIP ViT-B/32", "zero-shot-image-classification", make_clip, dual_shapes(77)),
    "siglip-base": Model("SigLIP base p16-224", "zero-shot-image-classification", make_siglip, dual_shapes(64)),
    "deberta-v3-base": Model("DeBERTa-v3-base", "text-classification", make_deberta,
                             (("classify", 1, 128), ("classify", 8, 128))),
    "modernbert-base": Model("ModernBERT-base", "text-classification", make_modernbert,
                             (("classify", 1, 128), ("classify", 8, 128))),
}
ITEMS = {"image": "images/s", "text": "texts/s", "classify": "sequences/s"}
OUTPUTS = {"image": "image_embeds", "text": "text_embeds", "classify": "logits"}


def checkpoint_for(key: str, workdir: Path, tiny: bool) -> Path:
    """The seeded random-init checkpoint, made once in the workdir (written to ``.partial``, then renamed)."""
    path = workdir / key / "checkpoint"
    if (path / "config.json").is_file():
        return path
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    MODELS[key].make(tiny).save_pretrained(partial)
    partial.rename(path)
    return path


# ------------------------------------------------------------------------------------------------------- exports

def kiln_export(checkpoint: Path, artifact: Path, task: str, precision: str) -> dict:
    """kiln.export at ``precision`` (int8 forced past its gate: random weights), reused when already there;
    returns kiln.json."""
    if not (artifact / "kiln.json").is_file():
        started = time.perf_counter()
        kiln.export(checkpoint, artifact, task=task, precision=precision, batch="1:32",
                    force_precision=precision != "fp32")
        print(f"  kiln exported {artifact} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    else:
        print(f"  reusing {artifact}", file=sys.stderr, flush=True)
    return json.loads((artifact / "kiln.json").read_text())


def ensure_optimum_venv() -> None:
    """Create .bench-venvs/optimum when it is missing; else reuse it."""
    if OPTIMUM_PYTHON.is_file():
        return
    print(f"creating the Optimum virtualenv {OPTIMUM_VENV} (minutes)", file=sys.stderr, flush=True)
    subprocess.run(["python3", "-m", "venv", str(OPTIMUM_VENV)], check=True)
    subprocess.run([str(OPTIMUM_VENV / "bin" / "pip"), "install", *OPTIMUM_INSTALL], check=True)


def optimum_exports(checkpoints: dict[str, Path], workdir: Path) -> dict:
    """The worker's answer: {"versions", "python", "jobs": {model key: {"fp32", "int8", "towers", "errors"}}}."""
    ensure_optimum_venv()
    jobs = [{"checkpoint": str(ckpt), "out": str(workdir / key / "optimum"), "task": MODELS[key].task,
             "towers": TOWERS if MODELS[key].dual else None} for key, ckpt in checkpoints.items()]
    print("Optimum exports (in its venv)", file=sys.stderr, flush=True)
    done = subprocess.run([str(OPTIMUM_PYTHON), str(BENCHMARKS / "_optimum_encoders_worker.py"),
                           json.dumps({"jobs": jobs})], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"The Optimum worker failed (exit {done.returncode}); its messages are above.")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    info["jobs"] = dict(zip(checkpoints, info["jobs"]))
    return info


def optimum_version(info: dict) -> str:
    v = info["versions"]
    return f"optimum {v.get('optimum')} / optimum-onnx {v.get('optimum-onnx')}"


# ------------------------------------------------------------------------------------------------------- runners

def session(path: Path) -> ort.InferenceSession:
    """An Optimum file with kiln's engine's session options (without kiln's own disabled optimizers)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def make_feed(model: Model, config, kind: str, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Random inputs of one shape: token ids (CLIP: between its start and end tokens) with a full mask, or normal
    pixel values."""
    rng = np.random.default_rng(batch * 1000 + seq)
    if kind == "image":
        size = config.vision_config.image_size
        channels = getattr(config.vision_config, "num_channels", 3)
        return {"pixel_values": rng.standard_normal((batch, channels, size, size), dtype=np.float32)}
    text = config.text_config if model.dual else config
    ids = rng.integers(1000, min(30000, text.vocab_size - 2), size=(batch, seq), dtype=np.int64)
    if config.model_type == "clip":
        ids[:, 0], ids[:, -1] = text.bos_token_id, text.eos_token_id
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64)}


def torch_runner(model, kind: str, feed: dict):
    tensors = {k: torch.from_numpy(v) for k, v in feed.items()}

    def run():
        with torch.inference_mode():
            if kind == "image":
                out = model.get_image_features(**tensors)
            elif kind == "text":
                out = model.get_text_features(**tensors)
            else:
                return model(**tensors).logits
            return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: an output object
    return run


def engine_runner(engine: OnnxRuntimeEngine, output: str, feed: dict):
    names = {i.name for i in engine.inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    return lambda: engine.run(feed, outputs=[output])[output]


def session_runner(sess: ort.InferenceSession, output: str, feed: dict):
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    return lambda: sess.run([output], feed)[0]


def time_rotating(runners: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """``warmup`` untimed calls per runner, then ``rounds`` rounds of every runner, the order rotated by one each
    round; ms per call per runner."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    names = list(runners)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def agreement(reference: np.ndarray, got: np.ndarray, normalize: bool) -> dict:
    """Cosine per row, and the largest absolute difference (of L2-normalized rows with ``normalize``: Optimum's
    CLIP/SigLIP graphs return the normalized embeddings that CLIPModel's forward returns, kiln and transformers'
    get_*_features the unnormalized ones)."""
    ref, out = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    ref_norm, out_norm = np.linalg.norm(ref, axis=-1, keepdims=True), np.linalg.norm(out, axis=-1, keepdims=True)
    cos = ((ref / ref_norm) * (out / out_norm)).sum(-1)
    diff = ref / ref_norm - out / out_norm if normalize else ref - out
    return {"cos": cos, "max_abs": float(np.abs(diff).max())}


def file_size(path: Path) -> float:
    """MB of an ONNX file and its external data files."""
    data = [p for p in path.parent.glob(path.name + "*") if p.suffix in (".onnx", ".data", ".onnx_data")]
    return sum(p.stat().st_size for p in data) / 1e6


def bench_model(key: str, checkpoint: Path, kiln_manifests: dict, optimum: dict, artifacts: Path, args) -> dict:
    """Every shape of one model, all runners interleaved; returns the medians, the agreement and the graphs' sizes."""
    spec = MODELS[key]
    print(f"[{spec.label}] timing", file=sys.stderr, flush=True)
    model = transformers.AutoModel.from_pretrained(checkpoint, attn_implementation="eager") if spec.dual else \
        transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager")
    model.eval()
    towers = ("vision", "text") if spec.dual else ("model",)

    # {tower: {runner: (run(feed) -> fn, path)}}
    graphs: dict[str, dict] = {tower: {} for tower in towers}
    for precision, manifest in kiln_manifests.items():
        if manifest is None:
            continue
        directory = artifacts / f"kiln-{precision}"
        for tower in towers:
            entry = {**manifest, **manifest["vision"]} if tower == "vision" else manifest
            path = directory / entry["model"]
            engine = OnnxRuntimeEngine(path, device="cpu", threads=THREADS, spinning=False, manifest=entry)
            graphs[tower][f"kiln {precision}"] = (lambda feed, output, e=engine: engine_runner(e, output, feed), path)
    for precision in ("fp32", "int8"):
        paths = (optimum.get("towers") or {}).get(precision, {}) if spec.dual else \
            ({"model": optimum[precision]} if optimum.get(precision) else {})
        for tower, path in paths.items():
            sess = session(Path(path))
            graphs[tower][f"Optimum {precision}"] = (lambda feed, output, s=sess: session_runner(s, output, feed),
                                                     Path(path))

    shapes, agree = {}, {}
    for kind, batch, seq in spec.shapes:
        tower = {"image": "vision", "text": "text"}.get(kind, "model")
        output = OUTPUTS[kind]
        feed = make_feed(spec, model.config, kind, batch, seq)
        runners = {"transformers eager": torch_runner(model, kind, feed)}
        runners.update({name: make(feed, output) for name, (make, _) in graphs[tower].items()})
        reference = runners["transformers eager"]().numpy()
        for name, run in runners.items():
            if name != "transformers eager":
                got = agreement(reference, run(), normalize=kind != "classify")
                slot = agree.setdefault(kind, {}).setdefault(name, {"cos": [], "max_abs": 0.0})
                slot["cos"].extend(got["cos"].tolist())
                slot["max_abs"] = max(slot["max_abs"], got["max_abs"])
        order = [name for name in RUNNERS if name in runners]
        times = time_rotating({name: runners[name] for name in order}, args.rounds, args.warmup)
        shapes[kind, batch, seq] = {name: {"median": float(np.median(t)), "p90": float(np.percentile(t, 90))}
                                    for name, t in times.items()}
        print(f"  {kind} b{batch}" + (f" s{seq}" if seq else "") + ": "
              + ", ".join(f"{n} {v['median']:.1f}" for n, v in shapes[kind, batch, seq].items()),
              file=sys.stderr, flush=True)
    sizes = {tower: {name: file_size(path) for name, (_, path) in per.items()} for tower, per in graphs.items()}
    return {"key": key, "label": spec.label + (" (tiny)" if args.tiny else ""), "shapes": shapes, "agree": agree,
            "sizes": sizes, "attn": model.config._attn_implementation}


# ------------------------------------------------------------------------------------------------------- report

def shape_name(kind: str, batch: int, seq: int) -> str:
    return {"image": f"image b{batch}", "text": f"text b{batch} s{seq}", "classify": f"b{batch} s{seq}"}[kind]


def kiln_best(row: dict) -> tuple[str, float] | None:
    kiln_rows = [(name, row[name]["median"]) for name in ("kiln fp32", "kiln int8") if name in row]
    return min(kiln_rows, key=lambda x: x[1]) if kiln_rows else None


def markdown_table(results: list[dict]) -> str:
    head = ["model", "shape", *(f"{r} ms (items/s)" for r in RUNNERS), "kiln best",
            *(f"{r} / kiln best" for r in RUNNERS)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(RUNNERS) + "---|" + "---:|" * len(RUNNERS)]
    for result in results:
        for (kind, batch, seq), row in result["shapes"].items():
            best = kiln_best(row)
            cells = [f"{row[r]['median']:.1f} ({batch * 1000 / row[r]['median']:.1f})" if r in row else "n/a"
                     for r in RUNNERS]
            cells.append(best[0].split()[1] if best else "n/a")
            cells += [f"{row[r]['median'] / best[1]:.2f}x" if r in row and best else "n/a" for r in RUNNERS]
            lines.append(f"| {result['label']} | {shape_name(kind, batch, seq)} ({ITEMS[kind]}) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_table(results: list[dict]) -> str:
    names = [r for r in RUNNERS if r != "transformers eager"]
    lines = ["| model | output | " + " | ".join(f"{n}: mean cos (min), max abs diff" for n in names) + " |",
             "|---|---|" + "---:|" * len(names)]
    for result in results:
        for kind, per in result["agree"].items():
            cells = [f"{np.mean(per[n]['cos']):.5f} ({np.min(per[n]['cos']):.5f}), {per[n]['max_abs']:.1e}"
                     if n in per else "n/a" for n in names]
            lines.append(f"| {result['label']} | {OUTPUTS[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_line(label: str, manifest: dict | None) -> str:
    """kiln int8's accuracy gate figures from its kiln.json."""
    if manifest is None:
        return f"- {label}: no kiln int8 artifact"
    acc = manifest.get("accuracy") or {}
    figures = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in acc.items()
                        if k not in ("gates", "measured_on", "passed", "gate"))
    metric = next(iter(acc), "?")
    gates = acc.get("gates") or ({metric: acc["gate"]} if "gate" in acc else {})
    verdict = "passed" if acc.get("passed") else "below the gate (written with force_precision)"
    return (f"- {label}: {figures}; gate {', '.join(f'{k} >= {v}' for k, v in gates.items())}: {verdict}"
            + (f"; measured on {acc['measured_on']}" if acc.get("measured_on") else ""))


def ratio_range(results: list[dict], num: str, den: str) -> str | None:
    """'a-bx (where)' of median(num) / median(den) over the shapes that have both."""
    pairs = [(row[num]["median"] / row[den]["median"], f"{r['label']} {shape_name(*shape)}")
             for r in results for shape, row in r["shapes"].items() if num in row and den in row]
    if not pairs:
        return None
    lo, hi = min(pairs), max(pairs)
    return f"{lo[0]:.2f}x ({lo[1]}) to {hi[0]:.2f}x ({hi[1]})"


def observations(results: list[dict], optimum: dict) -> str:
    parts = []
    for num, den, what in (("Optimum fp32", "kiln fp32", "Optimum fp32 took"), ("Optimum int8", "kiln int8",
                           "Optimum int8 took"), ("transformers eager", "kiln fp32", "transformers eager took")):
        span = ratio_range(results, num, den)
        if span:
            parts.append(f"{what} {span} kiln {den.split()[1]}'s time")
    rows = [(r, shape, row) for r in results for shape, row in r["shapes"].items()]
    int8_wins = [f"{r['label']} {shape_name(*shape)}" for r, shape, row in rows
                 if kiln_best(row) and kiln_best(row)[0] == "kiln int8"]
    both = [x for x in rows if "kiln fp32" in x[2] and "kiln int8" in x[2]]
    if both:
        span = ratio_range(results, "kiln int8", "kiln fp32")
        parts.append(f"kiln int8 was kiln's faster precision on {len(int8_wins)} of {len(both)} shapes "
                     f"(int8 / fp32 time {span})")
    beaten = [f"{r['label']} {shape_name(*shape)} ({name} {row[name]['median'] / kiln_best(row)[1]:.2f}x)"
              for r, shape, row in rows if kiln_best(row) for name in RUNNERS
              if not name.startswith("kiln") and name in row and row[name]["median"] < kiln_best(row)[1]]
    parts.append("no peer beat kiln's best precision on any shape" if not beaten else
                 "a peer beat kiln's best precision on " + "; ".join(beaten))
    low = [(np.mean(per[n]["cos"]), n, r["label"], OUTPUTS[kind]) for r in results for kind, per in r["agree"].items()
           for n in per if n.endswith("int8")]
    if low:
        worst = min(low)
        parts.append(f"the lowest int8 mean cosine against transformers was {worst[0]:.4f} ({worst[1]}, {worst[2]} "
                     f"{worst[3]})")
    fp32 = [(min(per[n]["cos"]), n, r["label"]) for r in results for per in r["agree"].values() for n in per
            if n.endswith("fp32")]
    if fp32:
        worst = min(fp32)
        parts.append(f"every fp32 graph matched transformers to a min cosine of {worst[0]:.6f} ({worst[1]}, "
                     f"{worst[2]})")
    missing = [f"{r['label']}" for r in results if not any(n.startswith("Optimum") for row in r["shapes"].values()
                                                            for n in row)]
    if missing:
        parts.append(f"Optimum ({optimum_version(optimum)}) gave no graph for {', '.join(missing)}")
    spread = max(v["p90"] / v["median"] for _, _, row in rows for v in row.values())
    parts.append(f"the largest p90/median over all cells was {spread:.2f}, a rough measure of timing noise on this "
                 f"shared {os.cpu_count()}-core machine")
    return "; ".join(parts) + "."


def optimum_notes(results: list[dict], optimum: dict) -> list[str]:
    lines = []
    for r in results:
        job = optimum["jobs"].get(r["key"], {})
        for step, message in (job.get("errors") or {}).items():
            lines.append(f"- {r['label']}, Optimum {step}: not supported by {optimum_version(optimum)}: {message}")
    return lines


def sizes_lines(results: list[dict]) -> list[str]:
    return [f"- {r['label']}" + (f" {tower}" if tower != "model" else "") + ": "
            + ", ".join(f"{name} {mb:.0f} MB" for name, mb in per.items())
            for r in results for tower, per in r["sizes"].items()]


def section(results, optimum, gates, kiln_errors, command, args, machine) -> str:
    opt = ", ".join(f"{k} {v}" for k, v in optimum["versions"].items())
    notes = optimum_notes(results, optimum)
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`", "",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "",
        "Machine:", *machine, "",
        f"Versions: main venv (kiln, transformers and every ONNX timing): {versions()}; Optimum venv (exports only): "
        f"python {optimum['python']}, {opt}", "",
        "Method: seeded random-init models at the public checkpoints' shapes (random weights time the same as "
        "trained ones): CLIP ViT-B/32 (`CLIPConfig()`), SigLIP base patch16 224 (`SiglipConfig()`), DeBERTa-v3-base "
        "(`DebertaV2Config`, 768 x 12, vocabulary 128100, relative attention p2c|c2p, 256 buckets, no token types) "
        "and ModernBERT-base (`ModernBertConfig()`), the last two with 3-label classification heads. kiln: "
        "`kiln.export(..., precision=\"fp32\"|\"int8\", batch=\"1:32\")` (int8 with `force_precision`: a random "
        "model's gate measures nothing; its figures are below), run on `OnnxRuntimeEngine(threads=2, "
        "spinning=False)`; CLIP/SigLIP through the artifact's separate `vision.onnx` and `text.onnx`. Optimum: "
        "exported in its own venv by `benchmarks/_optimum_encoders_worker.py` (`main_export(task=...)`; int8: "
        "`ORTQuantizer` + `AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)`). Optimum exports "
        "CLIP and SigLIP as one graph over both towers (logits included): each tower is cut out of it with "
        "`onnx.utils.extract_model` (its own nodes, unchanged), so each shape runs one tower for every runner. "
        f"Optimum's files run in the main venv's onnxruntime {ort.__version__} with kiln's engine's session options "
        f"(CPUExecutionProvider, `ORT_ENABLE_ALL`, `intra_op_num_threads={THREADS}`, `inter_op_num_threads=1`, "
        f"intra-op spinning off) but without the optimizers kiln turns off for its own graphs "
        f"({', '.join(CPU_DISABLED_OPTIMIZERS)}). transformers: PyTorch eager (no torch.compile), "
        f"`attn_implementation=\"{results[0]['attn'] if results else 'eager'}\"`, `torch.inference_mode()`, "
        f"`torch.set_num_threads({THREADS})`, `OMP_WAIT_POLICY=PASSIVE`. Inputs: random token ids in [1000, 30000) "
        "with a full mask (CLIP: its start and end tokens around them), text at 77 tokens (CLIP) and 64 (SigLIP), "
        "classification at 128; normal random pixel values at 224 px. Per model and shape: "
        f"{args.warmup} warm-up call(s) per runner, then {args.rounds} rounds of all runners (order rotated each "
        "round); medians in ms per call, items/s = batch / median. Ratios: a runner's median / the median of "
        "kiln's faster precision on that shape (above 1: slower than kiln).", "",
        markdown_table(results), "",
        f"Observations: {observations(results, optimum)}", "",
        "Outputs against transformers fp32 on the timed inputs (every row of both batch sizes): cosine per row "
        "and the largest absolute difference, of L2-normalized embeddings (Optimum's CLIP/SigLIP graphs return "
        "normalized ones) and of raw logits (classifiers: 3 logits of a random head, so the cosines are of "
        "3-vectors):", "",
        agreement_table(results), "",
        "kiln int8 accuracy gates (kiln.json `accuracy`; the checkpoints carry no tokenizer, so the text gate ran "
        "on random token ids):",
        *(gate_line(r["label"], gates[r["key"]]) for r in results), "",
        "Graph sizes (MB, weights included):", *sizes_lines(results), "",
        *(["Optimum could not export:", *notes, ""] if notes else []),
        *(["kiln could not export:", *(f"- {k}: {v}" for k, v in kiln_errors.items()), ""] if kiln_errors else []),
    ])


def write_results(output: Path, text: str) -> None:
    """write_section on a copy of ``output``, then one rename over it."""
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    if output.is_file():
        shutil.copy2(output, tmp)
    write_section(tmp, text, heading=SECTION)
    os.replace(tmp, output)


# --------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds and 1 warm-up, table only (for development)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 12)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per runner and shape (default 2)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-new"),
                        help="keep and reuse the checkpoints and exports in DIR")
    parser.add_argument("--tiny", action="store_true",
                        help="2-layer, 64-wide models of the same families: checks the script, times nothing useful")
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    parser.add_argument("--output", type=Path, default=BENCHMARKS / "RESULTS.md", help="RESULTS.md path for --write")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.tiny and args.write and args.output.resolve() == (BENCHMARKS / "RESULTS.md").resolve():
        parser.error("--tiny times toy models: it does not write benchmarks/RESULTS.md (--output elsewhere to check "
                     "the section)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    script = ["benchmarks/bench_new_encoders.py", *argv] if argv is not None else sys.argv
    command = shlex.join([".venv/bin/python", *script])
    torch.set_num_threads(THREADS)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per deduplicated initializer otherwise
    machine = machine_info()
    workdir = (args.workdir / "tiny" if args.tiny else args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = {key: checkpoint_for(key, workdir, args.tiny) for key in args.models}
    optimum = optimum_exports(checkpoints, workdir)
    results, gates, kiln_errors = [], {}, {}
    for key, checkpoint in checkpoints.items():
        print(f"[{MODELS[key].label}] kiln exports", file=sys.stderr, flush=True)
        manifests = {}
        for precision in ("fp32", "int8"):
            try:
                manifests[precision] = kiln_export(checkpoint, workdir / key / f"kiln-{precision}", MODELS[key].task,
                                                   precision)
            except Exception as err:  # noqa: BLE001 - reported, the other runners still timed
                print(f"  kiln {precision} export failed: {err}", file=sys.stderr, flush=True)
                first = (str(err).strip().splitlines() or [""])[0][:300]
                kiln_errors[f"{MODELS[key].label} {precision}"] = f"{type(err).__name__}: {first}"
                manifests[precision] = None
        gates[key] = manifests["int8"]
        results.append(bench_model(key, checkpoint, manifests, optimum["jobs"][key], workdir / key, args))
    machine.append(f"- load average at end (1/5/15 min): {load_average()}")
    print(markdown_table(results))
    print()
    print(agreement_table(results))
    print(observations(results, optimum), file=sys.stderr)
    for line in [*(gate_line(r["label"], gates[r["key"]]) for r in results), *optimum_notes(results, optimum),
                 *(f"- kiln could not export {k}: {v}" for k, v in kiln_errors.items())]:
        print(line, file=sys.stderr)
    if args.write:
        write_results(args.output, section(results, optimum, gates, kiln_errors, command, args, machine))
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
