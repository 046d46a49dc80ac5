"""``kiln bench``: latency of an artifact on this machine, optionally against its PyTorch reference.

For every (batch, sequence) shape: warm-up, then timed rounds; the median, p90 and p99 in milliseconds, throughput,
and the process's peak resident memory so far. Encoders time one forward pass; decoders time the prefill of a
``sequence``-token prompt and, with ``new_tokens``, the greedy decode steps after it (ms per token). With
``compare=("torch",)`` the PyTorch reference runs the same feeds, interleaved round by round with kiln so that both
see the same machine state; the ratio is torch's median over kiln's.

The kiln side uses only the runtime; the torch side needs ``kiln[torch]`` and the checkpoint the artifact came from.
"""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kiln.artifact import artifact_file, load_manifest
from kiln.errors import InputError
from kiln.runtime.measure import Feeds as _Feeds, machine  # noqa: F401 (machine: part of this module's interface)

WARMUP = 3


@dataclass
class Row:
    engine: str  # kiln | torch
    phase: str  # forward (encoders) | prefill | decode (decoders)
    batch: int
    seq: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # sequences/s (forward, prefill) or tokens/s (decode)
    peak_rss_mb: float  # the whole process's peak so far (kiln and torch share the process)
    rounds: int


def parse_sizes(text: str | None, name: str) -> tuple[int, ...] | None:
    """'1,8' -> (1, 8); a clear error for anything else."""
    if text is None:
        return None
    try:
        sizes = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise InputError(f"--{name} takes comma-separated integers such as 1,8; got {text!r}.") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"--{name} needs positive integers; got {text!r}.")
    return sizes


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if platform.system() == "Darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _summary(engine: str, phase: str, batch: int, seq: int, seconds: list[float], items: int) -> Row:
    ms = np.asarray(seconds) * 1000
    median = float(np.median(ms))
    return Row(engine, phase, batch, seq, round(median, 3), round(float(np.percentile(ms, 90)), 3),
               round(float(np.percentile(ms, 99)), 3), round(items / (median / 1000), 2), round(_peak_rss_mb(), 1),
               len(ms))


def _time_interleaved(runners: dict, rounds: int) -> dict[str, list[float]]:
    for run in runners.values():
        for _ in range(WARMUP):
            run()
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


def _torch_reference(manifest: dict):
    """The artifact's PyTorch reference, rebuilt from the checkpoint it was exported from."""
    from kiln.errors import require

    require("torch", "torch", "--compare torch")
    from kiln import hub
    from kiln.graphs.checkpoint import from_pretrained

    source = manifest.get("source", {})
    where = source.get("path") if source.get("path") and Path(source["path"]).exists() else source.get("id")
    if not where:
        raise InputError("--compare torch needs the checkpoint the artifact came from; kiln.json names none.")
    try:
        return from_pretrained(hub.resolve(where, source.get("revision")).path, task=manifest["task"])
    except Exception as err:
        raise InputError(f"--compare torch could not rebuild the reference from {where}: {err}") from err


def _torch_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def bench(artifact, batches=(1, 8), seqs=(16, 128, 512), *, threads: int | None = None, new_tokens: int | None = None,
          compare: tuple[str, ...] = (), rounds: int = 20, device: str = "cpu") -> dict:
    """Measure ``artifact``; returns {"artifact", "task", "machine", "rows": [Row as dict], "skipped": [...]}."""
    from kiln.files import read_json
    from kiln.runtime.engines.select import open_engine
    from kiln.runtime.generate import DecoderSession

    for engine_name in compare:
        if engine_name != "torch":
            raise InputError(f"--compare {engine_name!r}: only 'torch' (the PyTorch reference) is supported.")
    if rounds < 1:
        raise InputError("--rounds must be at least 1.")
    manifest = load_manifest(artifact)
    if manifest.get("encoder"):
        raise InputError(f"kiln bench times one-graph artifacts; {artifact} is an encoder-decoder "
                         f"({manifest['task']}). Time it with benchmarks/bench_whisper.py.")
    config = read_json(artifact_file(artifact, "config.json"), "Re-export the artifact.")
    feeds = _Feeds(manifest, config)
    decoder = manifest["task"] == "text-generation"
    if new_tokens is None:
        new_tokens = 32 if decoder else 0
    if new_tokens and not decoder:
        raise InputError("--new-tokens applies to text-generation artifacts only.")
    # Compared with torch, onnxruntime's threads must not busy-wait between runs: they would steal torch's cores.
    engine = open_engine(artifact, device=device, threads=threads, spinning=not compare)
    reference = _torch_reference(manifest) if "torch" in compare else None
    if reference is not None:
        _torch_threads(threads)
    if "pixel_values" in feeds.inputs:  # images: the sequence is fixed by the patch grid
        seqs = (int(manifest["outputs"][0]["shape"][1]) if len(manifest["outputs"][0]["shape"]) > 2 else 1,)
    rows, skipped = [], []
    max_seq = feeds.limit("sequence")
    max_batch = feeds.limit("batch")
    for batch in batches:
        for seq in seqs:
            if (max_seq and seq > max_seq) or (max_batch and batch > max_batch):
                skipped.append(f"batch {batch} x seq {seq}: outside the artifact's axes "
                               f"(batch <= {max_batch}, sequence <= {max_seq})")
                continue
            feed = feeds(batch, seq)
            if decoder:
                rows += _bench_decoder(DecoderSession(engine), reference, feed, batch, seq, new_tokens, rounds)
            else:
                runners = {"kiln": lambda: engine.run(feed)}
                if reference is not None:
                    runners["torch"] = _torch_forward(reference, manifest, feed)
                for name, seconds in _time_interleaved(runners, rounds).items():
                    rows.append(_summary(name, "forward", batch, seq, seconds, batch))
    engine.close()
    return {"artifact": str(artifact), "task": manifest["task"], "model_type": manifest.get("model_type"),
            "precision": manifest.get("precision"), "machine": machine(threads), "rounds": rounds,
            "rows": [asdict(r) for r in rows], "skipped": skipped}


def _torch_forward(reference, manifest: dict, feed: dict):
    import torch

    from kiln.exporter.trace.torch import reference_runner

    run = reference_runner(reference, [t["name"] for t in manifest["outputs"]])
    return lambda: torch.inference_mode()(run)(feed)


def _bench_decoder(session, reference, feed: dict, batch: int, seq: int, new_tokens: int, rounds: int) -> list[Row]:
    """Prefill of the prompt, then ``new_tokens`` greedy steps; kiln and torch interleaved per round. kiln runs the
    runtime's own decode loop (what text generation runs): its first step is the prefill, each later one a decode."""
    from kiln.runtime.generate import GenerationConfig, steps

    ids, mask, pos = feed["input_ids"], feed["attention_mask"], feed["position_ids"]
    greedy = GenerationConfig(max_new_tokens=new_tokens + 1)  # no EOS id: never stops early

    def kiln_generate(timings: dict):
        started = time.perf_counter()
        loop = steps(session, ids, mask, greedy)
        next(loop)  # the prefill, and the token chosen from its logits
        timings["prefill"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in loop:  # new_tokens decode steps; exhausting the loop releases the engine's state
            pass
        if new_tokens:
            timings["decode"].append((time.perf_counter() - started) / new_tokens)

    def torch_generate(timings: dict):
        import torch

        with torch.inference_mode():
            t_ids, t_mask, t_pos = (torch.from_numpy(a) for a in (ids, mask, pos))
            started = time.perf_counter()
            out = reference(input_ids=t_ids, attention_mask=t_mask, position_ids=t_pos)
            timings["prefill"].append(time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(new_tokens):
                token = out["logits"][:, -1].argmax(-1, keepdim=True)
                t_mask = torch.cat([t_mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
                t_pos = t_pos[:, -1:] + 1
                out = reference(input_ids=token, attention_mask=t_mask, position_ids=t_pos,
                                past_key_values=out["present_key_values"])
            if new_tokens:
                timings["decode"].append((time.perf_counter() - started) / new_tokens)

    engines = {"kiln": kiln_generate, **({"torch": torch_generate} if reference is not None else {})}
    timings = {name: {"prefill": [], "decode": []} for name in engines}
    for name, run in engines.items():
        for _ in range(WARMUP if new_tokens < 64 else 1):
            run({"prefill": [], "decode": []})
    for _ in range(rounds):
        for name, run in engines.items():
            run(timings[name])
    rows = []
    for name, t in timings.items():
        rows.append(_summary(name, "prefill", batch, seq, t["prefill"], batch))
        if new_tokens:
            rows.append(_summary(name, "decode", batch, seq, t["decode"], batch))
    return rows


def format_table(result: dict) -> str:
    """A plain-text table, one line per (engine, phase, batch, seq), with torch/kiln ratios when compared."""
    rows = result["rows"]
    kiln_median = {(r["phase"], r["batch"], r["seq"]): r["median_ms"] for r in rows if r["engine"] == "kiln"}
    lines = [f"{result['artifact']}: {result['model_type']} {result['task']} ({result['precision']}), "
             f"{result['machine']['cpu']}, threads {result['machine']['threads'] or 'default'}, "
             f"{result['rounds']} rounds",
             f"{'engine':<7}{'phase':<9}{'batch':>6}{'seq':>6}{'median ms':>11}{'p90':>9}{'p99':>9}"
             f"{'throughput':>16}{'peak RSS MB':>13}{'vs kiln':>9}"]
    for r in rows:
        ratio = ""
        if r["engine"] != "kiln" and (r["phase"], r["batch"], r["seq"]) in kiln_median:
            ratio = f"{r['median_ms'] / kiln_median[(r['phase'], r['batch'], r['seq'])]:.2f}x"
        unit = "tok/s" if r["phase"] == "decode" else "seq/s"
        lines.append(f"{r['engine']:<7}{r['phase']:<9}{r['batch']:>6}{r['seq']:>6}{r['median_ms']:>11.2f}"
                     f"{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['throughput']:>10.1f} {unit:<5}"
                     f"{r['peak_rss_mb']:>13.0f}{ratio:>9}")
    lines += [f"skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines)


def plot(result: dict, path) -> Path:
    """Latency (median ms) against sequence length, one line per (engine, phase, batch), written as a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'kiln[bench]'.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list] = {}
    for r in result["rows"]:
        series.setdefault((r["engine"], r["phase"], r["batch"]), []).append((r["seq"], r["median_ms"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {b: f"C{i}" for i, b in enumerate(sorted({k[2] for k in series}))}  # one colour per batch size
    styles = {"forward": "o", "prefill": "o", "decode": "s"}
    for (engine, phase, batch), points in sorted(series.items()):
        points.sort()
        label = f"{engine} batch {batch}" + ("" if phase == "forward" else f" {phase}")
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=styles[phase], color=colors[batch],
                linestyle="-" if engine == "kiln" else "--", label=label)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("median latency (ms)" + (" / ms per token for decode" if any(
        k[1] == "decode" for k in series) else ""))
    ax.set_title(f"{result['model_type']} {result['task']} ({result['precision']}) on {result['machine']['cpu']}",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
