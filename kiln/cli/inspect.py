"""kiln inspect OUT: what an artifact holds (inputs, outputs, ops, fused attention, validation)."""

from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("inspect", help="summarise an artifact")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--json", action="store_true", help="print kiln.json as is")
    p.set_defaults(func=run)


def _attention_line(attention: dict, framework: str | None) -> str:
    if attention.get("lowering") == "decomposed":
        why = ("tf2onnx emits no fused Attention op" if framework == "tf"
               else "attention probabilities are computed with eager math" if framework == "jax" else "see kiln.json")
        return (f"attention  decomposed into MatMul/Softmax ({framework} export: {why}); export with --framework "
                "torch for one fused node per layer")
    form = f", form {attention['form']}" if attention.get("form") else ""
    return f"attention  {attention.get('nodes')} fused nodes ({attention.get('lowering')}{form})"


def _graph_lines(g: dict, framework: str | None, title: str = "graph") -> list[str]:
    """One graph's file, attention, interface, ops and validation (kiln.json's top, or a further graph's record)."""
    val = g.get("validation", {})
    precision = f", precision {g['precision']}" if g.get("precision") else ""
    return [
        f"{title:<10} {g['model']}, opset {g.get('opset')}{precision}",
        _attention_line(g.get("attention", {}), framework),
        "inputs",
        *(f"  {t['name']:<18} {t['dtype']:<8} {t['shape']}" for t in g["inputs"]),
        *(f"  {t['name']:<18} {t['dtype']:<8} {t['shape']}  optional, default {t.get('default')}"
          for t in g.get("optional_inputs") or []),
        "outputs",
        *(f"  {t['name']:<18} {t['dtype']:<8} {t['shape']}" for t in g["outputs"]),
        "dynamic axes  " + ", ".join(f"{k} {v['min']}..{v['max']}" for k, v in g.get("dynamic_axes", {}).items()),
        "ops        " + ", ".join(f"{k} {v}" for k, v in sorted(g.get("op_counts", {}).items(), key=lambda kv: -kv[1])),
        f"validation {'passed' if val.get('passed') else 'FAILED'} on shapes {val.get('shapes')}",
        *(f"  {name:<18} max abs {e['max_abs']:.3g} (allowed {e.get('allowed', e['atol']):.2g}), max rel {e['max_rel']:.3g}"
          for name, e in val.get("outputs", {}).items()),
        *(f"  {k}: {v}" for k, v in val.get("task", {}).items()),
    ]


def run(args) -> int:
    from kiln.artifact import load_manifest

    m = load_manifest(args.artifact)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    src = m.get("source", {})
    encoder = m.get("encoder")  # an encoder-decoder artifact: the top describes the decoder, run per step
    lines = [
        f"artifact   {args.artifact}  (format {m['format_version']}, kiln {m.get('kiln_version')})",
        f"source     {src.get('id')}  revision={src.get('revision') or '-'}  weights sha256={str(src.get('weights_sha256'))[:16]}...",
        f"model      {m.get('model_type')} ({m.get('architecture')}), task {m['task']}, framework {m.get('framework')}",
        *_graph_lines(m, m.get("framework"), "decoder" if encoder else "graph"),
        *(_graph_lines(encoder, m.get("framework"), "encoder") if encoder else []),
        *([f"accuracy   {m['precision']} vs fp32 on {m['accuracy'].get('inputs')} inputs: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m["accuracy"].items() if k != "inputs")]
          if m.get("accuracy") else []),
        f"engines    {len(m.get('engines', []))} TensorRT engine(s)",
    ]
    print("\n".join(lines))
    return 0
