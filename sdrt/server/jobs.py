"""The job queue: a bounded FIFO served by one worker thread that owns the pipeline (not thread-safe).

A request becomes a :class:`Job` (an id, a function to run, a future for its result, its progress); the
HTTP side submits it and awaits the future. Progress, interrupt and skip go through ``Job.step``, which the
pipeline's sampler callback calls after every step; live previews go through ``Job.show``.

With ``max_rows`` > 1 the worker also takes the waiting jobs that may share the first one's batch (equal
``Batchable.key``, up to ``max_rows`` images in all, ahead of other waiting jobs) and runs them together.
Anything that serves jobs another way later (Ray Serve replicas) implements the same
``submit``/``current``/``running``/``find``.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)
FINISHED_KEPT = 256               # finished task ids remembered for /internal/progress


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs; the client should retry later (HTTP 503)."""


class Interrupted(Exception):
    """Raised inside a job's sampler callback after /interrupt: the job stops at the next step."""


class Skipped(Exception):
    """Raised inside a job's sampler callback after /skip: the current batch is dropped, the job goes on."""


@dataclass(frozen=True)
class Batchable:
    """How a job may share a batch: jobs with equal ``key`` run together through ``run(jobs)``, which
    returns each job's result (or the exception it ends with), in order."""
    key: Hashable
    rows: int                                    # images the job adds to the batch
    run: Callable[[list["Job"]], list[Any]]
    work: Any = None                             # what ``run`` needs of this job (sdrt serve: its Generation)


@dataclass(eq=False)
class Job:
    """One queued request. ``run(job)`` executes in the worker thread and returns the response body."""
    run: Callable[[Job], Any]
    id: str = field(default_factory=lambda: f"task({uuid.uuid4().hex[:15]})")
    name: str = ""                               # A1111's state.job, e.g. "txt2img"
    count: int = 1                               # batches (n_iter) in this job
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    number: int = 0                              # the batch running now, 0-based
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)
    batchable: Batchable | None = None           # None: the job runs alone
    preview: Callable[[Any], Any] | None = None  # latents -> live-preview image; None: no live preview
    preview_every: int = 10                      # steps between previews; <= 0: at the last step only
    current_image: Any = None                    # the latest live preview
    id_live_preview: int = -1                    # counts previews (A1111's /internal/progress id)

    def step(self, done: int, total: int) -> None:
        """Sampler callback: record progress; stop here if interrupted or skipped."""
        self.sampling_step, self.sampling_steps = done, total
        if self.interrupted.is_set():
            raise Interrupted(self.id)
        if self.skipped.is_set():
            self.skipped.clear()
            raise Skipped(self.id)

    def show(self, latents) -> None:
        """Sampler preview hook: render this step's denoised latents every ``preview_every`` steps."""
        every, step = self.preview_every, self.sampling_step
        if self.preview is not None and (step % every == 0 if every > 0 else step == self.sampling_steps):
            try:
                self.current_image = self.preview(latents)
            except Exception:                    # a preview is not worth failing the job for
                log.warning("job %s: live preview failed; no more previews for it", self.id, exc_info=True)
                self.preview = None
                return
            self.id_live_preview += 1

    def begin_batch(self, number: int) -> None:
        self.number, self.sampling_step = number, 0

    @property
    def progress(self) -> float:
        """Fraction done over all batches, as A1111's /progress computes it."""
        if self.started_at is None:
            return 0.0
        within = self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0
        return min((self.number + within) / max(self.count, 1), 1.0)

    @property
    def eta(self) -> float:
        """Seconds left, extrapolated from the time spent so far (A1111's eta_relative)."""
        if self.started_at is None or self.progress <= 0.0:
            return 0.0
        spent = time.time() - self.started_at
        return spent / self.progress - spent


class JobQueue:
    """At most ``size`` waiting jobs, run in order by one worker thread: one at a time, or with ``max_rows``
    > 1, together with the waiting jobs that may share the first one's batch."""

    def __init__(self, size: int, max_rows: int = 1):
        if size < 1:
            raise ValueError(f"queue size must be >= 1, not {size}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, not {max_rows}")
        self.size, self.max_rows = size, max_rows
        self.running: list[Job] = []             # the jobs the worker runs now (several when batched)
        self._waiting: collections.deque[Job] = collections.deque()
        self._known: dict[str, Job] = {}
        self._finished: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="sdrt-worker", daemon=True)
        self._worker.start()

    @property
    def current(self) -> Job | None:
        """The job running now (the first of a batch), None when idle."""
        running = self.running
        return running[0] if running else None

    def submit(self, job: Job) -> Future:
        """Queue ``job``; raises :class:`QueueFull` when ``size`` jobs already wait, ValueError for a
        task id already in use."""
        with self._lock:
            if job.id in self._known:
                raise ValueError(f"force_task_id {job.id!r} is already queued or running")
            if len(self._waiting) >= self.size:
                raise QueueFull(f"{self.size} requests are already waiting")
            self._waiting.append(job)
            self._known[job.id] = job
            self._ready.notify()
        return job.future

    def find(self, task_id: str) -> tuple[str, Job | None]:
        """("queued" | "active" | "finished" | "unknown", the job) for a task id."""
        with self._lock:
            job = self._known.get(task_id)
            if job is not None:
                return ("active" if job in self.running else "queued"), job
            job = self._finished.get(task_id)
            return ("finished" if job else "unknown"), job

    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Finish the jobs running now, drop the waiting ones, stop the worker."""
        with self._lock:
            dropped = list(self._waiting)
            self._waiting.clear()
            self._closed = True
            self._ready.notify()
        for job in dropped:
            job.future.cancel()
        self._worker.join(timeout=60)

    def _take(self) -> list[Job]:
        """The next job and the waiting jobs that share its batch; [] once closed."""
        with self._lock:
            while not self._waiting and not self._closed:
                self._ready.wait()
            if not self._waiting:
                return []
            first = self._waiting.popleft()
            group, b = [first], first.batchable
            if b is None or self.max_rows == 1:
                return group
            rows = b.rows
            for job in list(self._waiting):
                other = job.batchable
                if other is not None and other.key == b.key and rows + other.rows <= self.max_rows:
                    self._waiting.remove(job)
                    group.append(job)
                    rows += other.rows
            return group

    def _serve(self) -> None:
        while group := self._take():
            left = [job for job in group if not job.future.set_running_or_notify_cancel()]
            for job in left:                                     # their clients left while they waited
                self._retire(job)
            group = [job for job in group if job not in left]
            if not group:
                continue
            began = time.time()
            for job in group:
                job.started_at = began
            self.running = group
            try:
                if len(group) == 1:
                    results = [_outcome(group[0].run, group[0])]
                else:
                    results = _outcome(group[0].batchable.run, group)
                    results = results if isinstance(results, list) else [results] * len(group)
                for job, result in zip(group, results):
                    if job.future.done():                        # answered early (stopped in a batch)
                        continue
                    if isinstance(result, BaseException):        # handed to the HTTP side, never lost
                        log.debug("job %s failed: %r", job.id, result)
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
            finally:
                self.running = []
                for job in group:
                    self._retire(job)

    def _retire(self, job: Job) -> None:
        with self._lock:
            self._known.pop(job.id, None)
            self._finished[job.id] = job
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)


def _outcome(fn: Callable, arg) -> Any:
    """``fn(arg)``, or the exception it raised."""
    try:
        return fn(arg)
    except BaseException as e:
        return e
