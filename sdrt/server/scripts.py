"""A1111 scripts by title: ``script_name``/``script_args`` (selectable) and ``alwayson_scripts`` (extensions).

Empty for now. X/Y/Z plot, Prompt matrix, Prompts from file and ControlNet register a :class:`Script` here;
``/scripts`` and ``/script-info`` list what is registered, and a request naming anything else gets 422,
as A1111 answers an unknown script.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidRequest

TASKS = ("txt2img", "img2img")


@dataclass(frozen=True)
class Script:
    title: str                              # matched case-insensitively, as A1111 does
    alwayson: bool = False
    tasks: tuple[str, ...] = TASKS
    args: tuple[dict, ...] = field(default=())    # /script-info's description of script_args

    def describe(self, task: str) -> dict:
        return {"name": self.title.lower(), "is_alwayson": self.alwayson, "is_img2img": task == "img2img",
                "args": list(self.args)}


REGISTRY: dict[str, Script] = {}


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
            raise InvalidRequest(f"{kind} {name!r} not found; this server has: {listed(task) or 'none yet'}")
