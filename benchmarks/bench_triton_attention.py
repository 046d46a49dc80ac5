"""Triton attention kernel vs torch scaled_dot_product_attention on a CUDA GPU, each checked against the spec.

Shapes (fp16): prefill B=1/8, H=12, T=S=128/1024, D=64, non-causal (encoders) and causal (decoder prefill); decode
T=1 over a cache of S=1024/4096 with grouped-query heads (H=12, Hkv=4, D=64). Every case is checked against the NumPy
spec (kiln.kernels.attention.reference, batch rows 0 and B-1) before it is timed; times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed between calls).

Run from the repository root:

    python benchmarks/bench_triton_attention.py               # on a CUDA machine: times, writes benchmarks/RESULTS.md
    python benchmarks/bench_triton_attention.py --no-write    # prints the table only
    python benchmarks/bench_triton_attention.py --interpret   # no GPU needed: correctness only, tiny shapes, CPU
    python benchmarks/bench_triton_attention.py --sweep       # on a CUDA machine: times launch configurations

Without CUDA (and without --interpret) it says so and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

SECTION = "## Triton attention kernel vs torch SDPA (GPU)"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    H: int
    Hkv: int
    T: int
    S: int
    D: int
    causal: bool

    @property
    def shape(self) -> str:
        gqa = f", Hkv={self.Hkv}" if self.Hkv != self.H else ""
        return f"B={self.B} H={self.H}{gqa} T={self.T} S={self.S} D={self.D}"


def gpu_cases() -> list[Case]:
    cases = []
    for causal in (False, True):
        for B in (1, 8):
            for T in (128, 1024):
                cases.append(Case("prefill, causal" if causal else "encoder", B, 12, 12, T, T, 64, causal))
    for B in (1, 8):
        for S in (1024, 4096):
            cases.append(Case("decode, GQA", B, 12, 4, 1, S, 64, True))
    return cases


def interpret_cases() -> list[Case]:
    return [Case("encoder", 2, 4, 4, 13, 13, 32, False), Case("prefill, causal", 1, 4, 2, 7, 7, 64, True),
            Case("decode, GQA", 2, 8, 2, 1, 37, 64, True), Case("decode, MQA", 1, 4, 1, 1, 70, 128, True)]


def make_inputs(case: Case, dtype, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.B, case.H, case.T, case.D, generator=g).to(device=device, dtype=dtype)  # (B, H, T, D)
    k = torch.randn(case.B, case.Hkv, case.S, case.D, generator=g).to(device=device, dtype=dtype)  # (B, Hkv, S, D)
    v = torch.randn(case.B, case.Hkv, case.S, case.D, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def sdpa(q, k, v, causal: bool):
    """torch SDPA with the spec's bottom-right causality: is_causal is top-left aligned, so it is only used when
    T == S; a decode step (T == 1, bottom-right) sees every key and needs no mask at all."""
    import torch.nn.functional as F

    T, S = q.shape[2], k.shape[2]
    if causal and T not in (1, S):
        raise ValueError("this benchmark only has T == S or T == 1 cases")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and T == S, enable_gqa=q.shape[1] != k.shape[1])


def error_vs_reference(out, q, k, v, causal: bool) -> float:
    """Max abs difference from the NumPy spec (fp32 from the same fp16 inputs) over batch rows 0 and B-1: the spec
    materializes (B, H, T, S) scores, which is slow and large for whole big batches, and rows are independent."""
    import numpy as np

    from kiln.kernels.attention.reference import attention as reference

    worst = 0.0
    for b in sorted({0, q.shape[0] - 1}):
        np_ = lambda t: t[b : b + 1].float().cpu().numpy()  # noqa: E731
        expected = reference(np_(q), np_(k), np_(v), causal=causal).out
        worst = max(worst, float(np.abs(np_(out) - expected).max()))
    return worst


def run_interpret() -> int:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are interpreted from then on
    import torch

    from kiln.kernels.attention.triton import attention

    failed = 0
    for dtype, atol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for case in interpret_cases():
            q, k, v = make_inputs(case, dtype, "cpu")
            err = error_vs_reference(attention(q, k, v, causal=case.causal), q, k, v, case.causal)
            ok = err <= atol
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {str(dtype):14} {case.name:16} {case.shape:34} max |err| {err:.1e}")
    print("interpreter check:", "all cases within tolerance" if not failed else f"{failed} case(s) FAILED")
    return 1 if failed else 0


def run_gpu(args: argparse.Namespace) -> int:
    import torch
    import triton
    import triton.testing

    from kiln.kernels.attention.triton import attention

    dtype = torch.float16
    rows = []
    for case in gpu_cases():
        q, k, v = make_inputs(case, dtype, "cuda")
        ours = lambda: attention(q, k, v, causal=case.causal)  # noqa: E731
        theirs = lambda: sdpa(q, k, v, case.causal)  # noqa: E731
        err_ours = error_vs_reference(ours(), q, k, v, case.causal)
        err_theirs = error_vs_reference(theirs(), q, k, v, case.causal)
        t_ours = triton.testing.do_bench(ours, warmup=args.warmup, rep=args.rep, return_mode="median")
        t_theirs = triton.testing.do_bench(theirs, warmup=args.warmup, rep=args.rep, return_mode="median")
        # Kernel time alone, replayed from a CUDA graph: what a TensorRT plugin or a captured decode step pays.
        g_ours = triton.testing.do_bench_cudagraph(ours, rep=args.rep, return_mode="median")
        g_theirs = triton.testing.do_bench_cudagraph(theirs, rep=args.rep, return_mode="median")
        row = dict(case=case, triton_ms=t_ours, sdpa_ms=t_theirs, triton_graph_ms=g_ours, sdpa_graph_ms=g_theirs,
                   err_triton=err_ours, err_sdpa=err_theirs)
        rows.append(row)
        print(format_row(row), flush=True)
    worst = max(r["err_triton"] for r in rows)
    ok = worst <= args.atol
    print(f"max |triton - reference| over all cases: {worst:.1e} ({'ok' if ok else 'ABOVE'} atol {args.atol})")
    if not args.no_write:
        text = section(rows, shlex.join(["python", *sys.argv]), args, torch, triton)
        write(args.output, text)
    return 0 if ok else 1


SWEEP = [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
         for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for st in (2, 3)]


def run_sweep(args: argparse.Namespace) -> int:
    """Time every launch configuration of SWEEP on one case per kind (prefill and decode shapes differ most), to
    choose :func:`kiln.kernels.attention.triton.block_sizes`. Kernel time only (CUDA graph replay): at these sizes
    Python's launch overhead is as long as the kernel and would drown the differences. Prints; writes nothing."""
    import torch
    import triton.testing

    from kiln.kernels.attention.triton import attention, block_sizes

    picks = [c for c in gpu_cases() if (c.B, c.T, c.S) in ((8, 1024, 1024), (1, 128, 128), (1, 1, 4096), (8, 1, 4096))]
    for case in picks:
        q, k, v = make_inputs(case, torch.float16, "cuda")
        m0, n0 = block_sizes(case.T, case.D)
        timed = []
        # A decode step has one query row: tiles taller than 16 only add masked rows.
        configs = {tuple({**c, "block_m": 16 if case.T == 1 else c["block_m"]}.items()) for c in SWEEP}
        for cfg in map(dict, sorted(configs)):
            run = lambda: attention(q, k, v, causal=case.causal, **cfg)  # noqa: E731
            try:
                err = error_vs_reference(run(), q, k, v, case.causal)
                ms = triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median")
            except Exception as exc:  # out of shared memory or registers: that configuration does not compile
                print(f"  {cfg}: failed ({type(exc).__name__})", flush=True)
                continue
            timed.append((ms, cfg, err))
        default = lambda: attention(q, k, v, causal=case.causal)  # noqa: E731
        ms0 = triton.testing.do_bench_cudagraph(default, rep=50, return_mode="median")
        print(f"{case.name} {case.shape}: default (block_m={m0}, block_n={n0}) {ms0:.4f} ms", flush=True)
        for ms, cfg, err in sorted(timed, key=lambda t: t[0])[:5]:
            print(f"  {ms:.4f} ms {ms0 / ms:.2f}x  {cfg}  err {err:.1e}", flush=True)
    return 0


TABLE_HEAD = ["| case | shape | Triton ms | SDPA ms | SDPA / Triton | Triton ms (graph) | SDPA ms (graph) "
              "| SDPA / Triton (graph) | Triton GB/s (graph) | max err Triton | max err SDPA |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]


def gigabytes(c: Case) -> float:
    """fp16 bytes that must cross memory at least once (q, k, v in, out back): decode is bound by reading k and v."""
    return 2 * (2 * c.B * c.H * c.T * c.D + 2 * c.B * c.Hkv * c.S * c.D) / 1e9


def format_row(r: dict) -> str:
    c = r["case"]
    return (f"| {c.name} | {c.shape} | {r['triton_ms']:.4f} | {r['sdpa_ms']:.4f} | {r['sdpa_ms'] / r['triton_ms']:.2f}x "
            f"| {r['triton_graph_ms']:.4f} | {r['sdpa_graph_ms']:.4f} | {r['sdpa_graph_ms'] / r['triton_graph_ms']:.2f}x "
            f"| {gigabytes(c) / (r['triton_graph_ms'] / 1e3):.0f} | {r['err_triton']:.1e} | {r['err_sdpa']:.1e} |")


def section(rows: list[dict], command: str, args: argparse.Namespace, torch, triton) -> str:
    props = torch.cuda.get_device_properties(0)
    ratios = [r["sdpa_ms"] / r["triton_ms"] for r in rows]
    graph_ratios = [r["sdpa_graph_ms"] / r["triton_graph_ms"] for r in rows]
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`", "",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "",
        f"GPU: {torch.cuda.get_device_name(0)} (compute capability {props.major}.{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB)", "",
        f"Versions: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton.__version__}", "",
        "Method: fp16 inputs from `torch.randn`; `kiln.kernels.attention.triton.attention` (default blocks) against "
        "`torch.nn.functional.scaled_dot_product_attention` (torch picks its backend; `is_causal` when T == S, no mask "
        "for a decode step, `enable_gqa` for grouped heads). Times: median of `triton.testing.do_bench` "
        f"(warm-up {args.warmup} ms, {args.rep} ms of repetitions, L2 cleared between calls): each call launched "
        "from Python, as a torch program pays; (graph): median of `triton.testing.do_bench_cudagraph`, the calls "
        "replayed from a CUDA graph, so kernel time alone, as a TensorRT plugin or a captured decode step pays. "
        "Errors: max abs "
        "difference from the NumPy spec (`kiln.kernels.attention.reference`, fp32 from the same fp16 inputs) on batch "
        "rows 0 and B-1. Triton GB/s: bytes of q, k, v and out over the Triton graph time (a floor on traffic; decode "
        "is memory-bound, so compare it with the card's bandwidth).", "",
        *TABLE_HEAD, *(format_row(r) for r in rows), "",
        f"SDPA / Triton ranged from {min(ratios):.2f}x to {max(ratios):.2f}x launched from Python and from "
        f"{min(graph_ratios):.2f}x to {max(graph_ratios):.2f}x replayed from CUDA graphs (above 1: the Triton kernel "
        "is faster).",
        "",
    ])


def write(path: Path, text: str) -> None:
    # bench_encoders owns the section-replacing writer; it imports onnxruntime and transformers, which a GPU box set
    # up for torch + triton may lack, so the table is printed in full first and survives a failed import.
    print(text)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from bench_encoders import write_section
    except ImportError as exc:
        print(f"not written: importing benchmarks/bench_encoders.py failed ({exc}); paste the section above into "
              f"{path}", file=sys.stderr)
        return
    write_section(path, text, heading=SECTION)
    print(f"wrote {path}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="correctness only, tiny shapes, on CPU")
    parser.add_argument("--sweep", action="store_true", help="time launch configurations (GPU), write nothing")
    parser.add_argument("--no-write", action="store_true", help="print the table; leave RESULTS.md alone")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="RESULTS.md to write the section into")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition time, ms")
    parser.add_argument("--atol", type=float, default=4e-3, help="allowed max |Triton - spec| in fp16")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # kiln from this checkout, also when it is not installed
    if args.interpret:
        return run_interpret()
    os.environ["TRITON_INTERPRET"] = "0"  # timing needs the compiled kernel, whatever the shell exported
    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU (torch.cuda.is_available() is False): nothing to time, RESULTS.md left alone. "
              "Use --interpret for a CPU correctness check.")
        return 0
    return run_sweep(args) if args.sweep else run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
