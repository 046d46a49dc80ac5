"""The Ray Serve application: one deployment per artifact (its replicas each hold the artifact's ``ModelWorker``), and
one ingress deployment running the HTTP app (``kiln.serve.http``) over handles to them. The same application runs on
a local Ray on loopback and unchanged on a cluster; scaling is Ray Serve's (``num_replicas`` or its autoscaler on
ongoing requests), as are restarts of failed replicas.

Replies cross process boundaries as plain values: a worker's ``APIError`` comes back as ``("error", status, body)``
and is raised again at the ingress, so the client gets the same 4xx as in-process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from kiln.serve.http import create_app
from kiln.serve.openai import APIError


def _error(err: APIError) -> tuple:
    return ("error", err.status, err.body())


def _replica_lost(name: str, err: Exception) -> APIError:
    """A replica that died under a request (killed, out of memory): Ray Serve restarts it; this request is answered
    503 so that the client retries, instead of a 500 or a hang."""
    return APIError(503, f"The replica serving {name!r} stopped during this request ({type(err).__name__}); Ray "
                         "Serve restarts it. Retry the request.", type="server_error", code="replica_unavailable")


def _raise(status: int, body: dict):
    error = body["error"]
    raise APIError(status, error["message"], type=error["type"], param=error.get("param"), code=error.get("code"))


@serve.deployment
class ModelDeployment:
    """One artifact's replica."""

    def __init__(self, path: str, name: str, worker_options: dict):
        from kiln.serve.worker import ModelWorker

        self.worker = ModelWorker(path, name, **worker_options)

    def call(self, method: str, *args):
        try:
            return ("ok", getattr(self.worker, method)(*args))
        except APIError as err:
            return _error(err)

    def stream(self, *args):
        try:
            yield from self.worker.stream(*args)
        except APIError as err:
            yield {"error": _error(err)}


class RayBackend:
    def __init__(self, handles: dict, infos: dict):
        self.handles, self.infos = handles, infos

    def models(self) -> dict:
        return self.infos

    async def call(self, name: str, method: str, *args):
        try:
            kind, *value = await self.handles[name].call.remote(method, *args)
        except (RayActorError, ActorUnavailableError) as err:
            raise _replica_lost(name, err) from None
        if kind == "error":
            _raise(*value)
        return value[0]

    async def stream(self, name: str, *args) -> AsyncIterator[dict]:
        generator = self.handles[name].options(stream=True).stream.remote(*args)
        try:
            async for item in generator:
                if "error" in item:
                    _raise(*item["error"][1:])
                yield item
        except (RayActorError, ActorUnavailableError) as err:
            raise _replica_lost(name, err) from None
        finally:  # the client went away, or the stream ended: stop the replica's generation
            generator.cancel()


@serve.ingress()
class Ingress:
    """The HTTP API; ``names`` and ``handles`` pair up (Ray passes bound deployments as handles in positional
    arguments)."""

    def __init__(self, names: list[str], infos: dict, limits, *handles):
        self.backend = RayBackend(dict(zip(names, handles)), infos)
        self.limits = limits

    def __serve_build_asgi_app__(self):
        return create_app(self.backend, self.limits)


def build(artifacts: dict[str, str], options):
    """The application for ``artifacts`` ({name: directory}) with ``options`` (``kiln.serve.ServeOptions``)."""
    from kiln.artifact import load_manifest

    infos, bound = {}, []
    for name, path in artifacts.items():
        infos[name] = {"task": load_manifest(path)["task"], "created": int(time.time()), "artifact": path}
        scale = ({"autoscaling_config": {"min_replicas": options.autoscale[0], "max_replicas": options.autoscale[1],
                                         "target_ongoing_requests": max(1, options.max_batch_size)}}
                 if options.autoscale else {"num_replicas": options.replicas})
        deployment = ModelDeployment.options(
            name=f"model-{name}", max_ongoing_requests=options.max_ongoing_requests,
            ray_actor_options={"num_cpus": options.threads or 1}, **scale)
        bound.append(deployment.bind(path, name, options.worker_options()))
    ingress = serve.deployment(Ingress).options(name="kiln-http", ray_actor_options={"num_cpus": 0},
                                                max_ongoing_requests=max(options.max_ongoing_requests, 1) * 4)
    return ingress.bind(list(artifacts), infos, options.limits(), *bound)
