"""kiln build OUT: a TensorRT engine for this GPU, stored in the artifact (engines/<key>.plan), listed in kiln.json."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("build", help="build a TensorRT engine for an artifact on this GPU (needs kiln[tensorrt])")
    p.add_argument("artifact", help="artifact directory (from kiln export)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--profile", metavar="AXIS=MIN:OPT:MAX,...",
                   help="optimization profile over the artifact's dynamic axes, e.g. batch=1:8:32,seq=1:128:512 "
                        "(default: the exported ranges)")
    p.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache to reuse and extend across builds")
    p.add_argument("--version-compatible", action="store_true",
                   help="an engine that later TensorRT releases of the same major version can run")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching engine exists")
    p.set_defaults(func=run)


def run(args) -> int:
    import kiln

    entry = kiln.build(args.artifact, precision=args.precision, profile=args.profile, timing_cache=args.timing_cache,
                       version_compatible=args.version_compatible, force=args.force)
    print(f"{args.artifact}/{entry['file']}: TensorRT {entry['tensorrt']}, compute capability "
          f"{entry['compute_capability']}, {entry['precision']}, axes "
          + ", ".join(f"{name} {lo}:{opt}:{hi}" for name, (lo, opt, hi) in entry["axes"].items()))
    return 0
