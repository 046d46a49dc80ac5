"""kiln bench OUT: latency of an artifact (medians, p90/p99, throughput, peak memory), optionally against torch."""

from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("bench", help="measure an artifact's latency on this machine")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--batch", default="1,8", metavar="N,N", help="batch sizes (default 1,8)")
    p.add_argument("--seq", default="16,128,512", metavar="N,N",
                   help="sequence lengths, the prompt length for decoders (default 16,128,512)")
    p.add_argument("--threads", type=int, help="intra-op threads for onnxruntime (and torch); default: all cores")
    p.add_argument("--new-tokens", type=int, help="decoders: greedy tokens to time after the prefill (default 32)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per shape after 3 warm-up runs (default 20)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto", "tensorrt"))
    p.add_argument("--compare", action="append", choices=("torch",), default=[],
                   help="also time the PyTorch reference on the same feeds, interleaved with kiln")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw latency against sequence length per batch (matplotlib)")
    p.set_defaults(func=run)


def run(args) -> int:
    import kiln
    from kiln.benchmark import format_table, parse_sizes, plot

    result = kiln.bench(args.artifact, parse_sizes(args.batch, "batch"), parse_sizes(args.seq, "seq"),
                        threads=args.threads, new_tokens=args.new_tokens, compare=tuple(args.compare),
                        rounds=args.rounds, device=args.device)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    if args.plot:
        plot(result, args.plot)
    return 0
