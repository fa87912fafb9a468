"""``sdrt serve --batch-requests N``: compatible waiting requests run as one pipeline call, one UNet batch.

Two requests are compatible when they are plain txt2img (no ``script_name``, no enabled ControlNet unit, no
hires fix, ``n_iter`` 1) on the same checkpoint and every pipeline argument but the prompt, negative prompt,
seed and batch size is equal: width, height, steps, sampler and schedule, CFG scale, tiling, and the settings
that shape generation (``CLIP_stop_at_last_layers``, ``emphasis``, ``comma_padding_backtrack``,
``randn_source``), whether set by ``/options`` or ``override_settings``. The worker takes the first waiting
request and, ahead of the others, the waiting requests compatible with it, up to N images in all; each image
of the batch keeps its own prompt, negative prompt and seed, so each request gets the images it would get
alone (the UNet runs them as rows of one batch).

Rows whose text conditioning cannot share a batch (prompts that encode to different numbers of 75-token
chunks, different ``AND`` structure, different ``<lora:...>`` tags) are found by the pipeline before sampling;
the requests then run one after the other. A request stopped by /interrupt or /skip (or whose client left)
is answered at once with the images made so far (none); the others of its batch go on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import InvalidRequest
from .convert import Generation, Outcome, respond
from .jobs import Batchable, Interrupted, Job, Skipped


def batchable(gen: Generation, pipeline: Callable, save_dir: Path | None) -> Batchable | None:
    """How ``gen``'s job may share a batch (None: it runs alone)."""
    if gen.batch_kwargs is None or gen.n_iter != 1:
        return None
    key = (gen.task, gen.checkpoint.sha256, tuple(sorted(gen.batch_kwargs.items())))
    return Batchable(key, gen.batch_size, lambda jobs: run(jobs, pipeline, save_dir), work=gen)


def run(jobs: list[Job], pipeline: Callable, save_dir: Path | None) -> list:
    """Run the jobs as one pipeline call and answer each (None for a job already answered)."""
    gens: list[Generation] = [job.batchable.work for job in jobs]
    pipe = pipeline(gens[0].checkpoint)
    rows, stopped = _rows(gens), set()
    try:
        result = _call(pipe, jobs, gens, rows, stopped, save_dir)
    except Interrupted:                          # every job of the batch was stopped (and answered)
        return [None] * len(jobs)
    except InvalidRequest:                       # rows that cannot share a batch: each request alone
        return [None if job.future.done() else _alone(job) for job in jobs]
    answers = []
    for job, gen, mine in zip(jobs, gens, rows):
        if job in stopped:
            answers.append(None)
            continue
        out = Outcome(images=[gen.finish(image) for image in result.images[mine]] + gen.extra_images,
                      infotexts=result.infotexts[mine], seeds=result.seeds[mine],
                      prompts=[gen.info["prompt"]] * gen.batch_size,
                      negative_prompts=[gen.info["negative_prompt"]] * gen.batch_size,
                      clip_skip=result.parameters["clip_skip"])
        answers.append(respond(gen, out, job, save_dir))
    return answers


def _rows(gens: list[Generation]) -> list[slice]:
    """Each job's rows of the batch."""
    rows, first = [], 0
    for gen in gens:
        rows.append(slice(first, first + gen.batch_size))
        first += gen.batch_size
    return rows


def _call(pipe, jobs: list[Job], gens: list[Generation], rows: list[slice], stopped: set[Job],
          save_dir: Path | None):
    """One txt2img over every job's images; a job stopped on the way is answered (with no images) at once."""
    def step(done: int, total: int) -> None:
        for job, gen in zip(jobs, gens):
            if job in stopped:
                continue
            try:
                job.step(done, total)
            except (Interrupted, Skipped):
                stopped.add(job)
                job.future.set_result(respond(gen, Outcome(), job, save_dir))
        if len(stopped) == len(jobs):
            raise Interrupted("every request of the batch was stopped")

    def preview(latents) -> None:
        for job, mine in zip(jobs, rows):
            if job not in stopped:
                job.show(latents[mine])

    for job in jobs:
        job.begin_batch(0)
    return pipe.txt2img([gen.info["prompt"] for gen in gens for _ in range(gen.batch_size)],
                        negative_prompt=[gen.info["negative_prompt"] for gen in gens for _ in range(gen.batch_size)],
                        seeds=[gen.seed + i for gen in gens for i in range(gen.batch_size)],
                        batch_size=rows[-1].stop,
                        callback=step, preview=preview, **gens[0].batch_kwargs)


def _alone(job: Job):
    try:
        return job.run(job)
    except Exception as e:                       # this job's own error (e.g. an unknown LoRA), not the others'
        return e
