"""Serving artifacts over HTTP (extra ``kiln[serve]``): OpenAI-compatible endpoints, text-embeddings-inference's
``/embed``, one endpoint per pipeline, health and metrics.

- ``kiln.serve.asgi_app(artifacts, ...)``: the app in this process (any ASGI server runs it; ``kiln serve --local``).
- ``kiln.serve.app(artifacts, ...)``: a Ray Serve application with one deployment per artifact behind one HTTP
  ingress, to compose into your own or run with ``serve.run`` (what ``kiln serve`` does), on one machine or a cluster.

``artifacts``: artifact directories, or ``{"name": directory}`` to choose the model names clients use (default: the
directory's name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import InputError


@dataclass(frozen=True)
class ServeOptions:
    threads: int | None = None  # onnxruntime intra-op threads per replica
    device: str = "cpu"
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Ray Serve scales on ongoing requests
    max_batch_size: int = 8  # encoder inputs gathered into one engine call
    batch_wait_ms: float = 5.0
    max_ongoing_requests: int = 64
    pooling: str = "mean"  # how embeddings pool a text encoder's token vectors
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    max_batch_items: int = 256
    max_input_tokens: int | None = None
    max_tokens: int = 1024
    extra: dict = field(default_factory=dict)

    def limits(self):
        from kiln.serve.http import Limits

        return Limits(api_key=self.api_key, max_body_bytes=self.max_body_bytes, max_batch_items=self.max_batch_items,
                      max_tokens=self.max_tokens, max_ongoing_requests=self.max_ongoing_requests)

    def worker_options(self) -> dict:
        return {"threads": self.threads, "device": self.device, "max_batch_size": self.max_batch_size,
                "batch_wait_ms": self.batch_wait_ms, "pooling": self.pooling, "max_input_tokens": self.max_input_tokens}


def named(artifacts) -> dict[str, str]:
    """{model name: artifact directory}, every directory an artifact, names unique."""
    from kiln.artifact import is_artifact

    if isinstance(artifacts, (str, Path)):
        artifacts = [artifacts]
    pairs = list(artifacts.items()) if isinstance(artifacts, dict) else [(Path(a).name, a) for a in artifacts]
    if not pairs:
        raise InputError("Nothing to serve: give one or more artifact directories.")
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise InputError(f"Two artifacts would be served under one name ({names}); name them: "
                         "{'name': directory} (or `kiln serve name=DIR`).")
    for name, path in pairs:
        if not is_artifact(path):
            raise InputError(f"{path} is not a kiln artifact (no kiln.json); export it first with `kiln export`.")
    return {name: str(path) for name, path in pairs}


def asgi_app(artifacts, options: ServeOptions | None = None, **kwargs):
    """The HTTP app with every artifact's pipeline in this process."""
    from kiln.serve.http import LocalBackend, create_app
    from kiln.serve.worker import ModelWorker

    options = options or ServeOptions(**kwargs)
    workers = {name: ModelWorker(path, name, **options.worker_options()) for name, path in named(artifacts).items()}
    backend = LocalBackend(workers)
    app = create_app(backend, options.limits())
    app.state.backend = backend  # closing it stops the workers' batchers
    return app


def app(artifacts, options: ServeOptions | None = None, **kwargs):
    """A Ray Serve application: one deployment per artifact, one ingress deployment serving the HTTP API."""
    from kiln.serve.ray_app import build

    return build(named(artifacts), options or ServeOptions(**kwargs))


__all__ = ["ServeOptions", "app", "asgi_app"]
