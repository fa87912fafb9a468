"""The job queue: a bounded FIFO served by one worker thread that owns the pipeline (not thread-safe).

A request becomes a :class:`Job` (an id, a function to run, a future for its result, its progress); the
HTTP side submits it and awaits the future. Progress, interrupt and skip go through ``Job.step``, which the
pipeline's sampler callback calls after every step. Anything that serves jobs another way later (batching
compatible requests, Ray Serve replicas) implements the same ``submit``/``current``/``find``.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)
FINISHED_KEPT = 256               # finished task ids remembered for /internal/progress


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs; the client should retry later (HTTP 503)."""


class Interrupted(Exception):
    """Raised inside a job's sampler callback after /interrupt: the job stops at the next step."""


class Skipped(Exception):
    """Raised inside a job's sampler callback after /skip: the current batch is dropped, the job goes on."""


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

    def step(self, done: int, total: int) -> None:
        """Sampler callback: record progress; stop here if interrupted or skipped."""
        self.sampling_step, self.sampling_steps = done, total
        if self.interrupted.is_set():
            raise Interrupted(self.id)
        if self.skipped.is_set():
            self.skipped.clear()
            raise Skipped(self.id)

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
    """At most ``size`` waiting jobs, run one at a time, in order, by one worker thread."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"queue size must be >= 1, not {size}")
        self.size = size
        self.current: Job | None = None
        self._waiting: queue.Queue[Job | None] = queue.Queue(maxsize=size)
        self._known: dict[str, Job] = {}
        self._finished: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._serve, name="sdrt-worker", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; raises :class:`QueueFull` when ``size`` jobs already wait, ValueError for a
        task id already in use."""
        with self._lock:
            if job.id in self._known:
                raise ValueError(f"force_task_id {job.id!r} is already queued or running")
            try:
                self._waiting.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"{self.size} requests are already waiting") from None
            self._known[job.id] = job
        return job.future

    def find(self, task_id: str) -> tuple[str, Job | None]:
        """("queued" | "active" | "finished" | "unknown", the job) for a task id."""
        with self._lock:
            job = self._known.get(task_id)
            if job is not None:
                return ("active" if job is self.current else "queued"), job
            job = self._finished.get(task_id)
            return ("finished" if job else "unknown"), job

    def waiting(self) -> int:
        return self._waiting.qsize()

    def close(self) -> None:
        """Finish the job running now, drop the waiting ones, stop the worker."""
        while True:
            try:
                job = self._waiting.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        self._waiting.put(None)
        self._worker.join(timeout=60)

    def _serve(self) -> None:
        while (job := self._waiting.get()) is not None:
            if not job.future.set_running_or_notify_cancel():    # the client left while it waited
                self._retire(job)
                continue
            self.current, job.started_at = job, time.time()
            try:
                job.future.set_result(job.run(job))
            except BaseException as e:                            # handed to the HTTP side, never lost
                log.debug("job %s failed: %r", job.id, e)
                job.future.set_exception(e)
            finally:
                self.current = None
                self._retire(job)

    def _retire(self, job: Job) -> None:
        with self._lock:
            self._known.pop(job.id, None)
            self._finished[job.id] = job
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
