"""The FastAPI app: A1111's ``/sdapi/v1`` routes over the job queue, Basic auth, limits and error shape."""
from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidRequest, SdrtError
from ..pipelines import resize, samplers
from . import batching, controlnet, convert, preview, scripts
from . import options as opts
from .checkpoints import Checkpoints
from .codec import encode_png
from .jobs import Job, JobQueue, QueueFull
from .schemas import DetectRequest, Img2Img, PngInfoRequest, ProgressRequest, Txt2Img

RETRY_AFTER = 5                 # seconds a client is told to wait when the queue is full
POLL = 0.25                     # seconds between client-disconnect checks while a request waits


@dataclass(frozen=True)
class ServerOptions:
    """What ``sdrt serve`` was started with."""
    folders: tuple[Path, ...]
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[tuple[str, str], ...] = ()          # (user, password) pairs; empty: no auth
    runtime: str = "auto"
    threads: int = 0                                 # runtime intra-op threads; 0 lets the runtime decide
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    queue_size: int = 32
    limits: convert.Limits = field(default_factory=convert.Limits)
    outdir: Path | None = None                       # where save_images writes; None: save_images refused
    batch_requests: int = 1                          # images per batch of compatible requests; 1: no batching


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(422, f"request body is larger than this server's limit of {limit} bytes (--max-body-mb)")


class Service:
    """The state behind the routes: served checkpoints, settings, the queue."""

    def __init__(self, options: ServerOptions, load: Callable[[Path], object]):
        self.options = options
        self.checkpoints = Checkpoints(list(options.folders), load)
        self.settings = {**opts.DEFAULTS, "sd_model_checkpoint": self.checkpoints.all[0].title}
        self.queue = JobQueue(options.queue_size, max_rows=options.batch_requests)
        self.on_settings: Callable[[dict], None] = lambda values: None   # hears every change (Ray replicas)

    def current_options(self) -> dict:
        checkpoint = self.checkpoints.find(self.settings["sd_model_checkpoint"])
        return {**self.settings, "sd_checkpoint_hash": checkpoint.sha256}

    def set_options(self, values: dict) -> None:
        self.change_settings(opts.validated(values, self.checkpoints.find))

    def change_settings(self, values: dict) -> None:
        """Keep ``values`` (validated) as the settings from now on, and tell ``on_settings``."""
        self.settings |= values
        self.on_settings(values)

    async def generate(self, req, task: str, make: Callable, request: Request) -> dict:
        """Validate, queue, and wait for the job (cancelling it if the client goes away)."""
        convert.check_limits(req, self.options.limits)
        scripts.check(task, req.script_name, req.alwayson_scripts)
        if req.save_images and self.options.outdir is None:
            raise InvalidRequest("save_images: this server does not save images (start it with --outdir DIR)")
        over = opts.validated(req.override_settings or {}, self.checkpoints.find)
        settings = {**self.settings, **over}

        limits, images = self.options.limits, 0

        def build(r, s) -> convert.Generation:        # one generation of a script, checked as a request is
            nonlocal images
            convert.check_limits(r, limits)
            images += r.batch_size * r.n_iter
            if images > limits.max_images:
                raise InvalidRequest(f"script {req.script_name!r} makes more than {limits.max_images} images; "
                                     f"this server allows at most {limits.max_images} (batch_size*n_iter)")
            return make(r, s, self.checkpoints.find(s["sd_model_checkpoint"]))
        work = await run_in_threadpool(scripts.plan, task, req, settings, build)
        if work is None:
            gen = await run_in_threadpool(make, req, settings, self.checkpoints.find(settings["sd_model_checkpoint"]))
        if not req.override_settings_restore_afterwards:
            self.change_settings(over)

        def run(job: Job) -> dict:
            if work is not None:
                return scripts.execute(work, self.checkpoints.pipeline, job, self.options.outdir)
            return convert.execute(gen, self.checkpoints.pipeline(gen.checkpoint), job, self.options.outdir)
        job = Job(run, name=task, count=gen.n_iter if work is None else work.batches,
                  preview=preview.renderer(settings, lambda: self.checkpoints.current),
                  preview_every=settings["show_progress_every_n_steps"])
        if work is None and self.options.batch_requests > 1:
            job.batchable = batching.batchable(gen, self.checkpoints.pipeline, self.options.outdir)
        if req.force_task_id:
            job.id = req.force_task_id
        try:
            self.queue.submit(job)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        return await _wait(job, request)

    def interrupt(self) -> None:
        for job in self.queue.running:          # every request of a batch: they run as one
            job.interrupted.set()

    def skip(self) -> None:
        for job in self.queue.running:
            job.skipped.set()

    def progress(self, skip_current_image: bool = False) -> dict:
        job = self.queue.current
        state = {"skipped": bool(job and job.skipped.is_set()), "interrupted": bool(job and job.interrupted.is_set()),
                 "stopping_generation": False, "job": job.name if job else "", "job_count": job.count if job else 0,
                 "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started_at)) if job else "0",
                 "job_no": job.number if job else 0, "sampling_step": job.sampling_step if job else 0,
                 "sampling_steps": job.sampling_steps if job else 0, "queued": self.queue.waiting()}
        image = job.current_image if job and not skip_current_image else None
        return {"progress": job.progress if job else 0.0, "eta_relative": job.eta if job else 0.0, "state": state,
                "current_image": encode_png(image, "") if image else None, "textinfo": None,
                "current_task": job.id if job else None}

    def task_progress(self, req: ProgressRequest) -> dict:
        status, job = self.queue.find(req.id_task or "")
        active = status == "active"
        image = job.current_image if active and req.live_preview else None
        fresh = image is not None and job.id_live_preview != req.id_live_preview
        return {"active": active, "queued": status == "queued", "completed": status == "finished",
                "progress": job.progress if active else None, "eta": job.eta if active else None,
                "live_preview": "data:image/png;base64," + encode_png(image, "") if fresh else None,
                "id_live_preview": job.id_live_preview if active else -1,
                "textinfo": {"queued": "In queue...", "active": "Generating...", "finished": "Done",
                             "unknown": "Unknown task"}[status]}


async def _wait(job: Job, request: Request) -> dict:
    waiting = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=POLL)
        if done:
            return waiting.result()
        if await request.is_disconnected():      # nobody will read the answer: free the worker
            job.interrupted.set()
            job.future.cancel()                  # takes effect while the job still waits in the queue
            raise HTTPException(499, "client disconnected")


def create_app(options: ServerOptions, load: Callable[[Path], object] | None = None) -> FastAPI:
    """The A1111-compatible app serving ``options.folders``; ``load(folder)`` loads a pipeline (default:
    ``sdrt.load`` with the options' runtime, LoRA and embeddings folders)."""
    if load is None:
        from ..loader import load as sdrt_load

        def load(folder):
            return sdrt_load(folder, runtime=options.runtime, threads=options.threads, progress=False,
                             lora_dir=options.lora_dir, embeddings_dir=options.embeddings_dir)
    service = Service(options, load)
    app = FastAPI(title="sdrt", description="AUTOMATIC1111-compatible API served by sdrt")
    app.state.service = service
    _errors(app)
    app.add_middleware(Guard, max_body=options.limits.max_body_bytes)
    secured = [Depends(_auth(options.auth))] if options.auth else []     # no auth: Authorization is ignored
    app.include_router(_routes(service), prefix="/sdapi/v1", dependencies=secured)
    internal = APIRouter(dependencies=secured)

    @internal.post("/internal/progress")
    def task_progress(req: ProgressRequest):
        return service.task_progress(req)
    app.include_router(internal)
    app.include_router(_controlnet_routes(service), prefix="/controlnet", dependencies=secured)
    app.router.on_shutdown.append(service.queue.close)
    return app


def _routes(s: Service) -> APIRouter:
    r = APIRouter()

    @r.post("/txt2img")
    async def txt2img(req: Txt2Img, request: Request):
        return await s.generate(req, "txt2img", convert.txt2img, request)

    @r.post("/img2img")
    async def img2img(req: Img2Img, request: Request):
        return await s.generate(req, "img2img", convert.img2img, request)

    r.get("/options")(s.current_options)

    @r.post("/options")
    def set_options(values: dict[str, Any]):
        s.set_options(values)

    @r.get("/progress")
    def progress(skip_current_image: bool = False):
        return s.progress(skip_current_image)

    @r.post("/interrupt")
    def interrupt():
        s.interrupt()
        return {}

    @r.post("/skip")
    def skip():
        s.skip()
        return {}

    @r.post("/png-info")
    def png_info(req: PngInfoRequest):
        return convert.png_info(req.image)

    r.get("/samplers")(lambda: [{"name": n, "aliases": [a for a, b in samplers.ALIASES.items() if b == n],
                                 "options": {"scheduler": convert.DEFAULT_SCHEDULE[n]}
                                 if n in convert.DEFAULT_SCHEDULE else {}} for n in samplers.BASE_NAMES])
    r.get("/schedulers")(lambda: [{"name": k, "label": convert.SCHEDULES[k], "aliases": None,
                                   "default_rho": 7.0 if k == "karras" else -1, "need_inner_model": k == "uniform"}
                                  for k in convert.SUPPORTED_SCHEDULES])
    r.get("/sd-models")(lambda: [c.describe() for c in s.checkpoints.all])
    r.get("/sd-vae")(lambda: [])
    r.get("/upscalers")(lambda: [{"name": n, "model_name": None, "model_path": None, "model_url": None,
                                  "scale": 4} for n, (kind, _) in resize.UPSCALERS.items() if kind == "image"])
    r.get("/latent-upscale-modes")(lambda: [{"name": n} for n, (kind, _) in resize.UPSCALERS.items()
                                            if kind == "latent"])
    r.get("/scripts")(lambda: {task: scripts.listed(task) for task in scripts.TASKS})
    r.get("/script-info")(scripts.info)
    r.get("/cmd-flags")(lambda: _flags(s.options))
    r.get("/memory")(_memory)
    r.get("/embeddings")(lambda: _embeddings(s))
    r.get("/loras")(lambda: _loras(s.options.lora_dir))
    return r


def _controlnet_routes(s: Service) -> APIRouter:
    """sd-webui-controlnet's REST routes (``scripts/api.py``) over the current checkpoint's ControlNets."""
    r = APIRouter()
    r.get("/version")(lambda: {"version": controlnet.VERSION})
    r.get("/model_list")(lambda: {"model_list": controlnet.titles(
        s.checkpoints.find(s.settings["sd_model_checkpoint"]))})
    r.get("/module_list")(lambda: {"module_list": list(controlnet.MODULES),
                                   "module_detail": controlnet.module_detail()})

    @r.post("/detect")
    def detect(req: DetectRequest):
        images = controlnet.detect(req.controlnet_module, req.controlnet_input_images or req.controlnet_images,
                                   req.controlnet_processor_res, req.controlnet_threshold_a,
                                   req.controlnet_threshold_b)
        return {"images": [encode_png(image, "") for image in images], "info": "Success"}
    return r


def _flags(o: ServerOptions) -> dict:
    return {"api": True, "nowebui": True, "listen": o.host not in ("127.0.0.1", "localhost", "::1"),
            "server_name": o.host, "port": o.port, "api_auth": "***" if o.auth else None,
            "ckpt_dir": [str(f) for f in o.folders], "lora_dir": str(o.lora_dir) if o.lora_dir else None,
            "embeddings_dir": str(o.embeddings_dir) if o.embeddings_dir else None, "runtime": o.runtime,
            "queue_size": o.queue_size, "batch_requests": o.batch_requests, "limits": o.limits.__dict__}


def _memory() -> dict:
    page = os.sysconf("SC_PAGE_SIZE")
    total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    return {"ram": {"free": free, "used": total - free, "total": total}, "cuda": {"error": "sdrt runs without CUDA"}}


def _embeddings(s: Service) -> dict:
    """The loaded pipeline's textual-inversion embeddings (none before the first generation loads one)."""
    vocabulary = getattr(s.checkpoints.current, "vocabulary", None)
    loaded = {e.name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                       "shape": int(e.vectors.shape[1] + (0 if e.vectors_g is None else e.vectors_g.shape[1])),
                       "vectors": int(e.vectors.shape[0])}          # SDXL: clip_l + clip_g widths, as A1111
              for e in (vocabulary.embeddings if vocabulary else [])}
    return {"loaded": loaded, "skipped": {}}


def _loras(folder: Path | None) -> list[dict]:
    files = sorted(folder.rglob("*.safetensors")) if folder else []
    return [{"name": f.stem, "alias": f.stem, "path": str(f), "metadata": {}} for f in files]


def _auth(pairs: tuple[tuple[str, str], ...]):
    basic = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        ok = credentials is not None and any(
            secrets.compare_digest(credentials.username.encode(), user.encode())
            & secrets.compare_digest(credentials.password.encode(), password.encode()) for user, password in pairs)
        if not ok:
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})
    return check


def _error(status: int, e: Exception, detail, headers: dict | None = None) -> JSONResponse:
    """A1111's error body (modules/api/api.py ``handle_exception``)."""
    return JSONResponse({"error": type(e).__name__, "detail": detail, "body": "", "errors": str(e)},
                        status_code=status, headers=headers)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(convert.NotFound)
    async def not_found(request, e: convert.NotFound):
        return _error(404, e, e.detail)

    @app.exception_handler(InvalidRequest)
    async def invalid(request, e: InvalidRequest):
        return _error(422, e, str(e))

    @app.exception_handler(QueueFull)
    async def full(request, e: QueueFull):
        return _error(503, e, f"the queue is full ({e}); retry later", {"Retry-After": str(RETRY_AFTER)})

    @app.exception_handler(RequestValidationError)
    async def malformed(request, e: RequestValidationError):
        fields = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return _error(422, e, fields)

    @app.exception_handler(StarletteHTTPException)    # FastAPI's own (unparsable body: 400) and routing's
    async def http(request, e: StarletteHTTPException):
        return _error(e.status_code, e, e.detail, e.headers)

    @app.exception_handler(MemoryError)
    async def too_large(request, e: MemoryError):      # a request this machine cannot hold: ask for less
        return _error(422, e, "this request needs more memory than the server has"
                              f"{f' ({e})' if str(e) else ''}; ask for a smaller width*height or batch_size, "
                              "or lower --max-pixels")

    @app.exception_handler(SdrtError)
    async def server_side(request, e: SdrtError):        # a broken export or backend, not the request
        return _error(500, e, str(e))

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        return _error(500, e, "internal error")


class Guard:
    """ASGI middleware: ``X-Process-Time`` on every response, and the request-body limit."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began = time.perf_counter()

        async def timed(message):
            if message["type"] == "http.response.start":
                spent = f"{time.perf_counter() - began:.4f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"x-process-time", spent)]}
            await send(message)

        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            e = BodyTooLarge(self.max_body)
            return await _error(e.status_code, e, e.detail)(scope, receive, timed)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge(self.max_body)
            return message
        await self.app(scope, counted, timed)
