"""A1111 scripts by title: ``script_name``/``script_args`` (selectable) and ``alwayson_scripts`` (extensions).

Registered: "X/Y/Z plot", "Prompt matrix", "Prompts from file or textbox" (selectable) and "ControlNet"
(always on: its units are read by ``convert`` through ``controlnet.units``). ``/scripts`` and
``/script-info`` list them; a request naming anything else gets 422, as A1111 answers an unknown script.

A selectable script's ``plan(req, settings, build, task)`` returns ``(cells, order, finish)``: the
generations it runs (``build(req, settings)`` validates and converts one request, as a plain request is),
the order to run them in, and ``finish(outcomes)``, which turns their outcomes (in ``cells`` order) into
the answer's :class:`Outcome`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InvalidRequest
from . import controlnet, convert, prompt_scripts, xyz
from .convert import Generation, Outcome
from .jobs import Job

TASKS = ("txt2img", "img2img")


@dataclass(frozen=True)
class Script:
    title: str                              # matched case-insensitively, as A1111 does
    alwayson: bool = False
    tasks: tuple[str, ...] = TASKS
    args: tuple[dict, ...] = field(default=())    # /script-info's description of script_args
    plan: Callable | None = None            # selectable scripts: (req, settings, build, task) -> (cells, order, finish)

    def describe(self, task: str) -> dict:
        return {"name": self.title.lower(), "is_alwayson": self.alwayson, "is_img2img": task == "img2img",
                "args": list(self.args)}


@dataclass
class Plan:
    """A script's work for one request."""
    cells: list[Generation]
    order: list[int]
    finish: Callable[[list[Outcome]], Outcome]

    @property
    def batches(self) -> int:
        return sum(gen.n_iter for gen in self.cells)


_CONTROLNET_ARGS = tuple({"label": f"unit {i}", "value": None, "minimum": None, "maximum": None, "step": None,
                          "choices": None} for i in range(3))
REGISTRY: dict[str, Script] = {s.title.lower(): s for s in (
    Script(xyz.TITLE, args=xyz.ARGS, plan=xyz.plan),
    Script(prompt_scripts.MATRIX_TITLE, plan=prompt_scripts.matrix_plan,
           args=prompt_scripts.describe(prompt_scripts.MATRIX_NAMES, prompt_scripts.MATRIX_DEFAULTS)),
    Script(prompt_scripts.FILE_TITLE, plan=prompt_scripts.file_plan,
           args=prompt_scripts.describe(prompt_scripts.FILE_NAMES, prompt_scripts.FILE_DEFAULTS)),
    Script(controlnet.TITLE, alwayson=True, args=_CONTROLNET_ARGS),
)}


def listed(task: str) -> list[str]:
    return [s.title.lower() for s in REGISTRY.values() if task in s.tasks]


def info() -> list[dict]:
    return [s.describe(task) for s in REGISTRY.values() for task in s.tasks]


def check(task: str, script_name: str | None, alwayson: dict) -> None:
    """Refuse a ``script_name`` or ``alwayson_scripts`` entry that is not registered for ``task``."""
    wanted = [(script_name, False)] if script_name else []
    wanted += [(name, True) for name in alwayson or {}]
    for name, on in wanted:
        script = REGISTRY.get(name.lower())
        if script is None or script.alwayson != on or task not in script.tasks:
            kind = "always on script" if on else "script"
            raise InvalidRequest(f"{kind} {name!r} not found; this server has: {listed(task)}")


def plan(task: str, req, settings: dict, build: Callable[[object, dict], Generation]) -> Plan | None:
    """The work of the request's ``script_name`` (None without one); ``check`` has accepted it."""
    if not req.script_name:
        return None
    cells, order, finish = REGISTRY[req.script_name.lower()].plan(req, settings, build, task)
    return Plan(cells, order, finish)


def execute(work: Plan, pipeline: Callable[[object], object], job: Job, save_dir: Path | None) -> dict:
    """Run a script's cells in the worker (stopping at /interrupt) and answer as A1111 does."""
    outcomes: list[Outcome] = [Outcome() for _ in work.cells]
    batches = 0
    for k in work.order:
        if job.interrupted.is_set():
            break
        gen = work.cells[k]
        outcomes[k] = convert.run(gen, pipeline(gen.checkpoint), job, batches)
        batches += gen.n_iter
    return convert.respond(work.cells[0], work.finish(outcomes), job, save_dir)
