"""``sdrt serve --ray``: the same app as Ray Serve replicas behind Ray's HTTP proxy (DESIGN.md §9).

Each replica builds the app of :func:`sdrt.server.create_app` (same routes, auth, limits, error bodies) with
its own pipelines and job queue. Ray's proxy spreads requests over the replicas (at most ``PER_REPLICA`` each;
the rest wait in Ray's router for the first free replica) and its autoscaler adds or removes replicas on the
number of requests each one holds.

Held across replicas: the settings (POST /options, ``override_settings`` kept afterwards) go to one small
store actor, and every replica takes the newer ones before it answers a request; /progress, /interrupt,
/skip and /internal/progress ask every replica (``DeploymentHandle.broadcast``, in Ray since 2026; on older
Ray they see only the replica the proxy picked). Per replica: the job queue, the loaded pipelines, task ids
(``force_task_id`` is unique per replica only). Ray is imported only here (``pip install 'sdrt[ray]'``).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, replace

from ..errors import BackendUnavailable, InvalidRequest
from .app import ServerOptions, Service, create_app

log = logging.getLogger(__name__)
NAMESPACE = "sdrt"              # Ray namespace of the settings store
REPLICA_HEADER = b"x-sdrt-replica"
PER_REPLICA = 3                 # requests a replica holds: a job, one waiting to start, room for /progress...
BROADCAST_TIMEOUT = 10          # seconds to wait for every replica's answer to /progress and the like


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
        """Keyword arguments of ``serve.deployment``. Requests past ``PER_REPLICA`` per replica wait in Ray's
        router (``queue_size`` of them per proxy, then 503), where any replica, a new one too, takes them next."""
        scaling = ({"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                           "initial_replicas": max(self.min_replicas, 1),
                                           "target_ongoing_requests": self.target_ongoing_requests}}
                   if self.min_replicas is not None else {"num_replicas": self.replicas})
        return {"name": self.name, "ray_actor_options": {"num_cpus": self.cpus_per_replica},
                "max_ongoing_requests": PER_REPLICA, "max_queued_requests": queue_size, **scaling}


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


class Replica:
    """The deployment class. Its app (``self.app``) is built when the replica starts; these methods answer the
    broadcasts of the other replicas, which ask every replica about its jobs."""

    def replica_progress(self, skip_current_image: bool = False) -> dict:
        return Service.progress(self.app.state.service, skip_current_image)

    def replica_task_progress(self, req) -> dict:
        return Service.task_progress(self.app.state.service, req)

    def replica_interrupt(self) -> None:
        Service.interrupt(self.app.state.service)

    def replica_skip(self) -> None:
        Service.skip(self.app.state.service)


def application(options: ServerOptions, scale: RayOptions, store):
    """The Serve application: ``scale``'s replicas, each building ``create_app(options)`` when it starts."""
    _, serve = _ray()

    def build():
        context = serve.get_replica_context()
        replica = getattr(context, "replica_id", None)
        app = create_app(options)
        app.add_middleware(SharedSettings, service=app.state.service, store=store,
                           replica=getattr(replica, "unique_id", None) or str(context.replica_tag))
        if hasattr(serve.handle.DeploymentHandle, "broadcast"):       # Ray 2026 releases (ray#61472)
            _every_replica(app.state.service, lambda: serve.get_deployment_handle(scale.name, scale.name))
        checkpoints = app.state.service.checkpoints          # ready once loaded: autoscaling adds useful replicas
        checkpoints.pipeline(checkpoints.all[0])             # no job runs yet, so the worker's pipeline is free
        return app
    return serve.deployment(serve.ingress(build)(Replica), **scale.deployment(options.queue_size)).bind()


def _every_replica(service: Service, handle) -> None:
    """Answer /progress, /internal/progress, /interrupt and /skip over the jobs of every replica: the proxy
    sends such a request to any replica, seldom the busy one. Called from the routes' worker threads."""
    def ask(method: str, *args) -> list:
        answers = handle().broadcast(method, *args).results(timeout_s=BROADCAST_TIMEOUT, return_exceptions=True)
        answers = [a for a in answers if not isinstance(a, BaseException)]  # a replica going away: skip it
        if not answers:
            raise BackendUnavailable(f"no replica answered {method} within {BROADCAST_TIMEOUT} s")
        return answers
    service.progress = lambda skip_current_image=False: merged_progress(ask("replica_progress", skip_current_image))
    service.task_progress = lambda req: known_task(ask("replica_task_progress", req))
    service.interrupt = lambda: ask("replica_interrupt") and None
    service.skip = lambda: ask("replica_skip") and None


def merged_progress(answers: list[dict]) -> dict:
    """One /progress from every replica's: the job that started first, and every replica's queue."""
    running = [a for a in answers if a["state"]["job"]]
    first = min(running, key=lambda a: a["state"]["job_timestamp"]) if running else answers[0]
    return {**first, "state": {**first["state"], "queued": sum(a["state"]["queued"] for a in answers)}}


def known_task(answers: list[dict]) -> dict:
    """One /internal/progress: the answer of the replica that knows the task (active, queued, then done)."""
    return max(answers, key=lambda a: (a["active"], a["queued"], a["completed"]))


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
    try:
        ray.init(address=scale.address, namespace=NAMESPACE, log_to_driver=False)
    except ConnectionError as e:
        raise BackendUnavailable(f"--address {scale.address}: {e}; start a cluster with `ray start --head` or "
                                 "leave --address out to start Ray here") from None
    signal.signal(signal.SIGTERM, _interrupt)          # docker stop, systemd: clean up as on Ctrl-C
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


def _interrupt(signum, frame):
    raise KeyboardInterrupt


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
