"""kiln triton OUT REPO: a Triton Inference Server model repository serving the artifact (kiln.serve.triton)."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("triton", help="write a Triton Inference Server model repository for an artifact (configs, "
                       "the ONNX graph or TensorRT plan, Python models for tokenization and post-processing, an "
                       "ensemble)")
    p.add_argument("artifact", help="artifact directory (from kiln export)")
    p.add_argument("repository", help="Triton model repository to write into (created if missing; other models "
                   "there are left alone)")
    p.add_argument("--name", help="model name clients call (default: the artifact directory's name); the models it "
                   "chains are NAME_preprocess, NAME_model, NAME_postprocess")
    p.add_argument("--max-batch-size", type=int, help="largest batch Triton forms (default: the artifact's largest; "
                   "0: no batching by Triton)")
    p.add_argument("--instances", type=int, default=1, help="instances of each model (default 1)")
    p.add_argument("--gpu", action="store_true", help="run the model on the GPU (KIND_GPU); default KIND_CPU")
    p.add_argument("--tensorrt", action="store_true", help="serve the artifact's TensorRT plan from `kiln build` "
                   "(implies --gpu; the plan loads only on its GPU model and TensorRT version)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="which TensorRT plan, when there are several")
    p.add_argument("--max-queue-delay-us", type=int, default=100,
                   help="how long the dynamic batcher waits to fill a batch, in microseconds (default 100)")
    p.add_argument("--pad-to-multiple-of", type=int, default=1, help="pad token arrays to a multiple of N, so that "
                   "more requests share a shape and Triton batches them together (default 1)")
    p.add_argument("--force", action="store_true", help="replace models of the same names in the repository")
    p.set_defaults(func=run)


def run(args) -> int:
    from kiln.serve.triton import write_repository

    written = write_repository(args.artifact, args.repository, force=args.force, name=args.name,
                               max_batch_size=args.max_batch_size, instances=args.instances,
                               kind="KIND_GPU" if args.gpu or args.tensorrt else "KIND_CPU",
                               max_queue_delay_us=args.max_queue_delay_us, tensorrt=args.tensorrt,
                               precision=args.precision, pad_to_multiple_of=args.pad_to_multiple_of)
    for path in written:
        print(path)
    return 0
