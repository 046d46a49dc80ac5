"""``kiln`` command line: each command is a few lines over the public API."""

from __future__ import annotations

import argparse
import logging
import sys

from kiln import __version__
from kiln.cli import bench as bench_cmd
from kiln.cli import build as build_cmd
from kiln.cli import embed as embed_cmd
from kiln.cli import export as export_cmd
from kiln.cli import inspect as inspect_cmd
from kiln.cli import prune as prune_cmd
from kiln.cli import push as push_cmd
from kiln.cli import run as run_cmd
from kiln.cli import serve as serve_cmd
from kiln.cli import triton as triton_cmd
from kiln.errors import KilnError, ValidationError

COMMANDS = {"export": export_cmd, "build": build_cmd, "run": run_cmd, "bench": bench_cmd, "inspect": inspect_cmd,
            "prune": prune_cmd, "push": push_cmd, "serve": serve_cmd, "triton": triton_cmd,
            "embed": embed_cmd}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description="Export transformer checkpoints to validated ONNX "
                                     "artifacts and run them with a light runtime.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    args = parser.parse_args(argv)
    # kiln's own progress at INFO; other libraries (onnx-ir, httpx, ...) only at WARNING unless --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("kiln").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args) or 0
    except ValidationError as err:
        print(f"kiln {args.command}: {err}", file=sys.stderr)
        return 2
    except KilnError as err:
        if args.verbose:
            raise
        print(f"kiln {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kiln {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
