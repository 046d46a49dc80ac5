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
