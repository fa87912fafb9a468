"""``sdrt serve --ray``: the same app as Ray Serve replicas behind Ray's HTTP proxy (DESIGN.md §9).

Each replica builds the app of :func:`sdrt.server.create_app` (same routes, auth, limits, error bodies) with
its own pipelines and job queue. Ray's proxy spreads requests over the replicas and its autoscaler adds or
removes replicas on the number of requests each one holds (running + queued).

Held across replicas: the settings (POST /options, ``override_settings`` kept afterwards) go to one small
store actor, and every replica takes the newer ones before it answers a request. Per replica: the job
queue, so /progress, /interrupt, /skip and task ids (``force_task_id``, /internal/progress) only see the
jobs of the replica the proxy sends that request to. Ray is imported only here (``pip install 'sdrt[ray]'``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

from ..errors import BackendUnavailable, InvalidRequest
from .app import ServerOptions, create_app

log = logging.getLogger(__name__)
NAMESPACE = "sdrt"              # Ray namespace of the settings store
REPLICA_HEADER = b"x-sdrt-replica"
CONTROL_REQUESTS = 4            # ongoing requests a replica takes past its queue: /progress, /options...


@dataclass(frozen=True)
class RayOptions:
    """How ``sdrt serve --ray`` deploys: fixed ``replicas``, or autoscaling between ``min_replicas`` and
    ``max_replicas`` aiming at ``target_ongoing_requests`` per replica."""
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 1.0           # one image job at a time: more means a queue, so scale up
    address: str | None = None                     # None: start Ray here; "auto" / "ray://host:10001": join
    cpus_per_replica: float = 1.0                  # Ray CPUs reserved by a replica (its runtime threads too)
    name: str = "sdrt"                             # Serve application name

    def __post_init__(self):
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise InvalidRequest("give both --min-replicas and --max-replicas for autoscaling, or --replicas")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise InvalidRequest(f"need 0 <= --min-replicas <= --max-replicas, not {self.min_replicas}.."
                                 f"{self.max_replicas}")
        if self.max_replicas == 0 or self.replicas < 1:
            raise InvalidRequest("serve at least one replica (--replicas >= 1, --max-replicas >= 1)")
        if self.cpus_per_replica <= 0 or self.target_ongoing_requests <= 0:
            raise InvalidRequest("--cpus-per-replica and --target-ongoing-requests must be > 0")

    def deployment(self, queue_size: int) -> dict:
        """Keyword arguments of ``serve.deployment``."""
        scaling = ({"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                           "initial_replicas": max(self.min_replicas, 1),
                                           "target_ongoing_requests": self.target_ongoing_requests}}
                   if self.min_replicas is not None else {"num_replicas": self.replicas})
        return {"name": self.name, "ray_actor_options": {"num_cpus": self.cpus_per_replica},
                "max_ongoing_requests": queue_size + 1 + CONTROL_REQUESTS, **scaling}


class SettingsStore:
    """A Ray actor holding the settings changed on any replica, with a version that grows on each change."""

    def __init__(self):
        self.version, self.values = 0, {}

    def update(self, values: dict) -> int:
        self.version, self.values = self.version + 1, {**self.values, **values}
        return self.version

    def since(self, version: int) -> tuple[int, dict] | None:
        """The changed settings if any came after ``version``."""
        return (self.version, self.values) if self.version > version else None


class SharedSettings:
    """ASGI middleware of a replica: take the store's newer settings before each request, and hold the
    response until this replica's own changes reached the store (a client's next request may go elsewhere);
    tags each response with the replica's id (``X-Sdrt-Replica``)."""

    def __init__(self, app, service, store, replica: str):
        self.app, self.service, self.store, self.replica = app, service, store, replica.encode()
        self.version, self.pending = 0, []
        service.on_settings = self.publish

    def publish(self, values: dict) -> None:
        self.pending.append(self.store.update.remote(values))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if newer := await self.store.since.remote(self.version):
            self.version, values = newer
            self.service.settings |= values

        async def tagged(message):
            if message["type"] == "http.response.start":
                pending, self.pending = self.pending, []
                await asyncio.gather(*pending)
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.replica)]}
            await send(message)
        await self.app(scope, receive, tagged)


def application(options: ServerOptions, scale: RayOptions, store):
    """The Serve application: ``scale``'s replicas, each building ``create_app(options)`` when it starts."""
    _, serve = _ray()

    def build():
        context = serve.get_replica_context()
        replica = getattr(context, "replica_id", None)
        app = create_app(options)
        app.add_middleware(SharedSettings, service=app.state.service, store=store,
                           replica=getattr(replica, "unique_id", None) or str(context.replica_tag))
        return app
    ingress = serve.ingress(build)()
    return serve.deployment(ingress, **scale.deployment(options.queue_size)).bind()


def settings_store(name: str):
    """A fresh settings store for application ``name`` (a stale one from a killed run is replaced)."""
    ray, _ = _ray()
    actor_name = f"{name}-settings"
    try:
        ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE))
    except ValueError:
        pass
    return ray.remote(num_cpus=0)(SettingsStore).options(name=actor_name, namespace=NAMESPACE,
                                                          lifetime="detached").remote()


def serve(options: ServerOptions, scale: RayOptions) -> None:
    """Deploy on Ray (started here, or the cluster at ``scale.address``) and serve until interrupted."""
    ray, rs = _ray()
    if options.threads == 0:
        options = replace(options, threads=max(int(scale.cpus_per_replica), 1))
    ray.init(address=scale.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        rs.start(http_options={"host": options.host, "port": options.port})
        store = settings_store(scale.name)
        rs.run(application(options, scale, store), name=scale.name, route_prefix="/")
        log.warning("sdrt: serving %d export(s) on Ray at http://%s:%d (Ctrl-C stops)", len(options.folders),
                    options.host, options.port)
        while True:
            time.sleep(3600)
    finally:
        _stop(ray, rs, scale.name)


def _stop(ray, serve, name: str) -> None:
    """Delete the application and its store; leave the cluster (a local one stops with this process)."""
    try:
        serve.delete(name)
        ray.kill(ray.get_actor(f"{name}-settings", namespace=NAMESPACE))
    except Exception as e:                       # Ray already gone: nothing left to clean
        log.debug("ray cleanup: %r", e)
    ray.shutdown()


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise BackendUnavailable(f"sdrt serve --ray needs Ray Serve ({e.name} is missing): "
                                 "pip install 'sdrt[ray]'") from None
    return ray, serve
