"""kiln serve OUT [OUT ...]: the artifacts over HTTP (OpenAI-compatible), on Ray Serve or in this process."""

from __future__ import annotations

import os

from kiln.errors import InputError


def add_parser(sub):
    p = sub.add_parser("serve", help="serve artifacts over HTTP: OpenAI-compatible endpoints, /embed, pipelines")
    p.add_argument("artifacts", nargs="+", metavar="[NAME=]OUT", help="artifact directories (NAME= sets the model "
                   "name clients use; default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--local", action="store_true", help="serve from this process with uvicorn instead of Ray Serve")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray on loopback)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per artifact (Ray)")
    p.add_argument("--autoscale", metavar="MIN:MAX", help="let Ray Serve scale each artifact between MIN and MAX")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads per replica")
    p.add_argument("--max-batch-size", type=int, default=8, help="encoder inputs gathered into one engine call")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long the first input waits for others")
    p.add_argument("--max-ongoing-requests", type=int, default=64, help="beyond these, 503 at once")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: KILN_API_KEY if set)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens a request may generate")
    p.add_argument("--max-input-tokens", type=int, help="most tokens an embedding input may have")
    p.add_argument("--max-batch-items", type=int, default=256, help="most inputs per request")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20)
    p.set_defaults(func=run)


def options_from(args):
    from kiln.serve import ServeOptions

    autoscale = None
    if args.autoscale:
        try:
            low, high = (int(x) for x in args.autoscale.split(":"))
        except ValueError:
            raise InputError(f"--autoscale takes MIN:MAX (two integers), got {args.autoscale!r}.") from None
        if not 0 <= low <= high or high < 1:
            raise InputError(f"--autoscale {args.autoscale}: need 0 <= MIN <= MAX and MAX >= 1.")
        autoscale = (low, high)
    for name in ("replicas", "max_batch_size", "max_ongoing_requests", "max_tokens", "max_batch_items", "port"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    return ServeOptions(threads=args.threads, replicas=args.replicas, autoscale=autoscale,
                        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                        max_ongoing_requests=args.max_ongoing_requests,
                        api_key=args.api_key or os.environ.get("KILN_API_KEY") or None, max_tokens=args.max_tokens,
                        max_input_tokens=args.max_input_tokens, max_batch_items=args.max_batch_items,
                        max_body_bytes=args.max_body_bytes)


def artifacts_from(values: list[str]) -> dict[str, str]:
    from pathlib import Path

    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or Path(value).exists():
            name, path = Path(value).name, value
        pairs[name] = path
    return pairs


def run(args) -> int:
    from kiln.errors import require

    options = options_from(args)
    artifacts = artifacts_from(args.artifacts)
    if args.local:
        require("uvicorn", "serve", "kiln serve --local")
        import uvicorn

        from kiln.serve import asgi_app

        uvicorn.run(asgi_app(artifacts, options), host=args.host, port=args.port, log_level="info")
        return 0
    require("ray", "serve", "kiln serve")
    import ray
    from ray import serve

    from kiln.serve import app

    address = args.address or os.environ.get("RAY_ADDRESS")
    application = app(artifacts, options)  # checks the artifacts before Ray starts
    ray.init(address=address, include_dashboard=False, **({} if address else {"_node_ip_address": "127.0.0.1"}))
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="kiln", route_prefix="/", blocking=True)
    return 0
