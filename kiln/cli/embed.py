"""kiln embed OUT input.parquet out.parquet --column text: embeddings of a Parquet column, a batch job on Ray Data."""

from __future__ import annotations

import os
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("embed", help="embed a Parquet column with Ray Data (one output file per input file)")
    p.add_argument("artifact", help="a feature-extraction artifact (or a CLIP/SigLIP one: its text tower)")
    p.add_argument("source", help="a Parquet file, or a directory of them")
    p.add_argument("target", help="the output file (for a file) or directory (for a directory)")
    p.add_argument("--column", default="text", help="the column to embed (default: text)")
    p.add_argument("--pooling", default="mean", choices=("mean", "cls"))
    p.add_argument("--actors", type=int, default=1, help="pipeline actors (one engine each)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per actor")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=run)


def run(args) -> int:
    from kiln.errors import require

    require("ray", "serve", "kiln embed")
    import ray

    from kiln.serve.data import embed_files, input_files

    input_files(Path(args.source))  # a missing input fails before Ray starts
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"_node_ip_address": "127.0.0.1"}))
    written = embed_files(args.artifact, args.source, args.target, column=args.column, threads=args.threads,
                          concurrency=args.actors, batch_size=args.batch_size, pooling=args.pooling)
    print(f"wrote {len(written)} file(s)")
    return 0
