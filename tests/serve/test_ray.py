"""kiln.serve.app on a local Ray Serve on loopback: one deployment per artifact behind the HTTP ingress, spoken to by
the openai client over real HTTP; a worker's refusal crosses the process boundary as the same 4xx."""

from __future__ import annotations

import socket

import numpy as np
import pytest

import kiln
from kiln.cli.__main__ import main
from kiln.serve import ServeOptions, app

ray = pytest.importorskip("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve():
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def test_served_on_ray(ray_serve, artifacts):
    import httpx
    import openai
    from ray import serve

    names = {"minilm": str(artifacts("bert", "feature-extraction")), "sst": str(artifacts("bert", "text-classification"))}
    serve.run(app(names, ServeOptions(threads=1, max_batch_size=4)), name="kiln", route_prefix="/")
    base = f"http://127.0.0.1:{ray_serve}"
    api = openai.OpenAI(api_key="none", base_url=f"{base}/v1")
    assert {m.id for m in api.models.list().data} == {"minilm", "sst"}
    texts = ["the movie was terrible", "paris is the capital city of france"]
    got = [d.embedding for d in api.embeddings.create(model="minilm", input=texts).data]
    want = kiln.pipeline("feature-extraction", names["minilm"])(texts, pooling="mean", normalize=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    out = httpx.post(f"{base}/v1/pipelines/sst", json={"inputs": texts, "top_k": None}, timeout=60).json()["output"]
    assert out == [[{k: (float(v) if k == "score" else v) for k, v in d.items()} for d in r]
                   for r in kiln.pipeline("text-classification", names["sst"])(texts, top_k=None)]
    refused = httpx.post(f"{base}/v1/completions", json={"model": "sst", "prompt": "x"}, timeout=60)
    assert refused.status_code == 400 and "text-classification model" in refused.json()["error"]["message"]
    serve.delete("kiln")


@pytest.mark.parametrize("argv,says", [
    (["serve", "OUT", "--autoscale", "3"], "--autoscale takes MIN:MAX"),
    (["serve", "OUT", "--replicas", "0"], "--replicas must be at least 1"),
    (["serve", "/nonexistent/artifact", "--local"], "is not a kiln artifact"),
])
def test_cli_refusals(argv, says, capsys):
    assert main(argv) != 0
    assert says in capsys.readouterr().err


def test_map_batches_and_kiln_embed(ray_serve, artifacts, tmp_path, capsys):
    """A pipeline per actor over a Ray Dataset gives each row the pipeline's own output; kiln embed writes one whole
    Parquet file per input file and skips those already written on a rerun."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kiln.serve.data import map_batches

    texts = [f"the river runs through paris {i}" if i % 2 else f"hello world {i}" for i in range(40)]
    artifact = artifacts("bert", "feature-extraction")
    want = np.array(kiln.pipeline("feature-extraction", artifact)(texts, pooling="mean", normalize=True))
    rows = map_batches(ray.data.from_items([{"text": t, "id": i} for i, t in enumerate(texts)]), artifact,
                       batch_size=16, pooling="mean", normalize=True, return_tensors=True).take_all()
    assert [r["id"] for r in rows] == list(range(40))
    np.testing.assert_allclose(np.stack([r["embedding"] for r in rows]), want, atol=1e-5)

    source = tmp_path / "in"
    source.mkdir()
    for part in range(2):
        pq.write_table(pa.table({"text": texts[part * 20:(part + 1) * 20], "id": list(range(part * 20, part * 20 + 20))}),
                       source / f"part{part}.parquet")
    assert main(["embed", str(artifact), str(source), str(tmp_path / "out"), "--batch-size", "8"]) == 0
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / f"part{p}.parquet") for p in range(2)])
    assert table.column("id").to_pylist() == list(range(40))
    np.testing.assert_allclose(np.stack(table.column("embedding").to_pylist()), want, atol=1e-5)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left
    capsys.readouterr()
    assert main(["embed", str(artifact), str(source), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.count("exists: skipped") == 2
    assert main(["embed", str(artifacts("bert", "text-classification")), str(source), str(tmp_path / "x")]) != 0


def test_a_killed_replica_is_restarted_and_requests_get_answers(ray_serve, artifacts):
    """Kill the model's replica while requests come: every request is answered (200, or 503 asking to retry, never a
    hang or a traceback), and requests succeed again once Ray Serve has restarted it."""
    import time

    import httpx
    from ray import serve

    serve.run(app({"minilm": str(artifacts("bert", "feature-extraction"))}, ServeOptions(threads=1)), name="kiln",
              route_prefix="/")
    url = f"http://127.0.0.1:{ray_serve}/v1/embeddings"
    body = {"model": "minilm", "input": ["the river runs through paris"]}
    assert httpx.post(url, json=body, timeout=60).status_code == 200
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "model-minilm" in a["name"])
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    codes, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline and 200 not in codes:  # until the restarted replica answers
        response = httpx.post(url, json=body, timeout=60)
        codes.append(response.status_code)
        if response.status_code != 200:
            assert response.status_code == 503 and "Retry" in response.json()["error"]["message"], response.text
            time.sleep(0.2)
    assert codes[-1] == 200, codes
    serve.delete("kiln")
