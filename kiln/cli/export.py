"""kiln export MODEL OUT --task T: checkpoint -> validated ONNX artifact."""

from __future__ import annotations

from kiln import TASKS


def add_parser(sub):
    p = sub.add_parser("export", help="export a checkpoint (directory or hub id) to an artifact directory")
    p.add_argument("model", help="checkpoint directory or Hugging Face hub id")
    p.add_argument("output", help="artifact directory to write (replaced atomically)")
    p.add_argument("--task", default="feature-extraction", choices=TASKS)
    p.add_argument("--framework", default="torch", choices=("torch", "jax", "tf"),
                   help="reference to trace and validate against: torch (torch.onnx), jax (flax nnx via jax2onnx) or "
                   "tf (keras via tf2onnx); BERT and LLaMA families (default torch)")
    p.add_argument("--attention", default="auto",
                   choices=("auto", "onnx", "onnx-3d", "onnx-packed", "contrib", "contrib-mha", "decomposed"),
                   help="encoder attention form: auto (fastest measured on onnxruntime CPU), onnx (standard ONNX "
                   "Attention as traced: for TensorRT), onnx-3d, onnx-packed, contrib (com.microsoft.Attention), "
                   "contrib-mha (com.microsoft.MultiHeadAttention), decomposed")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset, >= 23 (default 23)")
    p.add_argument("--batch", metavar="MIN:MAX", help="dynamic batch range (default 1:64)")
    p.add_argument("--seq", metavar="MIN:MAX", help="dynamic sequence range (default 1:model maximum)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to export")
    p.add_argument("--keep-failed", action="store_true", help="on validation failure keep the artifact at OUT.failed")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8", "int4", "auto"),
                   help="fp16/bf16: typed half-precision graph with fp32 norms/softmax/reductions (GPUs, TensorRT; "
                   "bf16 does not run on onnxruntime CPU); int8: dynamic per-channel int8 MatMuls (encoders), weight-only "
                   "blockwise (decoders; Whisper: both); int4: weight-only int4 (MatMulNBits, for decoders); refused "
                   "below its accuracy gate against fp32; auto: every CPU candidate exported and gated, the fastest "
                   "on this machine kept (kiln.json precision_auto)")
    p.add_argument("--force-precision", action="store_true", help="write a reduced precision even below its gate")
    p.add_argument("--output-hidden-states", action="store_true", help="add hidden_states.{i} graph outputs")
    p.add_argument("--output-attentions", action="store_true", help="add attentions.{i} graph outputs (probabilities)")
    p.add_argument("--head-mask", action="store_true", help="add an optional head_mask (layers, heads) input, default "
                   "all ones: heads can be switched off per call (pipelines: head_mask=...) without re-exporting")
    p.set_defaults(func=run)


def run(args) -> int:
    import kiln

    manifest = kiln.export(args.model, args.output, task=args.task, opset=args.opset, batch=args.batch, seq=args.seq,
                           revision=args.revision, keep_failed=args.keep_failed,
                           output_hidden_states=args.output_hidden_states, output_attentions=args.output_attentions,
                           precision=args.precision, force_precision=args.force_precision, framework=args.framework, attention=args.attention,
                           head_mask=args.head_mask)
    worst = max(e["max_abs"] for e in manifest["validation"]["outputs"].values())
    attention = (f"{manifest['attention']['nodes']} fused Attention nodes"
                 if manifest["attention"]["lowering"] == "onnx-attention" else "attention decomposed (MatMul/Softmax)")
    print(f"{args.output}: {manifest['model_type']} {manifest['task']} from {manifest['framework']}, {attention}, "
          f"validated (max abs diff {worst:.2g})")
    auto = manifest.get("precision_auto")
    if auto:  # what each candidate measured here, and the choice
        shown = ", ".join(f"{p} {c['ms']:.2f} ms" if c["passed"] else f"{p} below its gate"
                          for p, c in auto["candidates"].items())
        print(f"precision auto: {auto['chosen']} ({shown}; {auto['metric']}, {auto['machine']['isa']})")
    return 0
