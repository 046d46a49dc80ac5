"""kiln prune MODEL OUT --keep 0.75: score the attention heads, prune the least important, export, report."""

from __future__ import annotations

from kiln import TASKS


def add_parser(sub):
    p = sub.add_parser("prune", help="prune the least important attention heads of a checkpoint and export it "
                       "(BERT and LLaMA families)")
    p.add_argument("model", help="checkpoint directory or Hugging Face hub id")
    p.add_argument("output", help="artifact directory to write")
    p.add_argument("--keep", type=float, default=0.75, help="fraction of the heads to keep (default 0.75)")
    p.add_argument("--task", default="feature-extraction", choices=TASKS)
    p.add_argument("--save-checkpoint", metavar="DIR", help="also keep the pruned checkpoint (config.json with "
                   "pruned_heads + model.safetensors, loadable by transformers 4.x and kiln)")
    p.add_argument("--batch", metavar="MIN:MAX", help="dynamic batch range (default 1:64)")
    p.add_argument("--seq", metavar="MIN:MAX", help="dynamic sequence range (default 1:model maximum)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8", "int4"))
    p.set_defaults(func=run)


def run(args) -> int:
    import kiln

    manifest = kiln.prune(args.model, args.output, keep=args.keep, task=args.task,
                          save_checkpoint=args.save_checkpoint, batch=args.batch, seq=args.seq,
                          precision=args.precision)
    report = manifest["pruning"]
    metric = next(iter(report["accuracy"]))
    print(f"{args.output}: heads kept per layer {report['heads_kept']} ({sum(report['heads_kept'])} of "
          f"{len(report['heads_kept']) * len(report['importance'][0])}); {metric} {report['accuracy'][metric]:.4f} "
          f"against the unpruned model; {report['speedup']:.2f}x the unpruned artifact's speed "
          f"({report['latency_ms']['unpruned']:.1f} -> {report['latency_ms']['pruned']:.1f} ms)")
    return 0
