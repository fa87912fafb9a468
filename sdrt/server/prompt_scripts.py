"""A1111's "Prompt matrix" (``scripts/prompt_matrix.py``) and "Prompts from file or textbox"
(``scripts/prompts_from_file.py``) through ``script_name``/``script_args``, as in A1111 v1.10.

Prompt matrix, script_args ``[put_at_start, different_seeds, prompt_type, variations_delimiter, margin_size]``:
the prompt (or negative prompt) split at ``|`` into a base and k optional parts gives 2^k prompts, the base
joined with every subset of the parts (by ", " or " "), all with the same seed unless different_seeds (seed
+ i). The answer is the annotated grid (2^(k//2) rows) followed by the images.

Prompts from file or textbox, script_args ``[checkbox_iterate, checkbox_iterate_batch, prompt_position,
prompt_txt]``: one job per non-empty line, either a prompt or A1111's options (``--prompt "a cat" --steps 20
--sd_model NAME``...); a line's prompt is put before (``start``) or after the request's prompt. Seeds follow
A1111: "Iterate seed every line" adds batch_size * n_iter per line; "Use same random seed for all lines"
fixes a random seed once. Unlike A1111, which then generates from the raw line, a line that does not parse
is refused (422) naming the line.
"""
from __future__ import annotations

import random
import shlex
from typing import Any, Callable, Iterator

from ..errors import InvalidRequest
from ..pipelines.pipeline import MAX_SEED
from . import grids
from .convert import Generation, Outcome
from .schemas import Processing

MATRIX_TITLE = "Prompt matrix"
MATRIX_DEFAULTS = [False, False, "positive", "comma", 0]
MATRIX_NAMES = ["put_at_start", "different_seeds", "prompt_type", "variations_delimiter", "margin_size"]
FILE_TITLE = "Prompts from file or textbox"
FILE_DEFAULTS = [False, False, "start", ""]
FILE_NAMES = ["checkbox_iterate", "checkbox_iterate_batch", "prompt_position", "prompt_txt"]
# the options a line may set (A1111's prompt_tags), with how their values are read
TAGS = {"sd_model": str, "prompt": str, "negative_prompt": str, "styles": str, "seed": int, "subseed": int,
        "subseed_strength": float, "seed_resize_from_h": int, "seed_resize_from_w": int, "sampler_name": str,
        "batch_size": int, "n_iter": int, "steps": int, "cfg_scale": float, "width": int, "height": int,
        "restore_faces": lambda v: v == "true", "tiling": lambda v: v == "true",
        "do_not_save_samples": lambda v: v == "true", "do_not_save_grid": lambda v: v == "true",
        "prompt_for_display": str}
REFUSED_TAGS = {"sampler_index": "give --sampler_name instead", "outpath_samples": "the server chooses where "
                "files go", "outpath_grids": "the server chooses where files go"}


def describe(names: list[str], defaults: list) -> tuple[dict, ...]:
    """/script-info's ``args``."""
    return tuple({"label": n, "value": v, "minimum": None, "maximum": None, "step": None, "choices": None}
                 for n, v in zip(names, defaults))


def arguments(script_args: list[Any], title: str, names: list[str], defaults: list) -> list[Any]:
    """``script_args`` with missing trailing arguments at the UI's defaults."""
    if len(script_args) > len(defaults):
        raise InvalidRequest(f"script_args: {title} takes at most {len(defaults)} arguments ({', '.join(names)}), "
                             f"not {len(script_args)}")
    return list(script_args) + defaults[len(script_args):]


def matrix_prompts(prompt: str, put_at_start: bool, delimiter: str) -> Iterator[str]:
    """A1111's combinations, lazily (there are 2^k): prompt i joins the base with the parts whose bit is set
    in i."""
    parts = prompt.split("|")
    for i in range(2 ** (len(parts) - 1)):
        chosen = [text.strip().strip(",") for n, text in enumerate(parts[1:]) if i & (1 << n)]
        chosen = chosen + [parts[0]] if put_at_start else [parts[0]] + chosen
        yield delimiter.join(chosen)


def matrix_plan(req: Processing, settings: dict, build: Callable[[Processing, dict], Generation], task: str):
    put_at_start, different_seeds, prompt_type, delimiter, margin = arguments(
        req.script_args, MATRIX_TITLE, MATRIX_NAMES, MATRIX_DEFAULTS)
    if prompt_type not in ("positive", "negative"):
        raise InvalidRequest(f"script_args: unknown prompt type {prompt_type!r}; use 'positive' or 'negative'")
    if delimiter not in ("comma", "space"):
        raise InvalidRequest(f"script_args: unknown variations delimiter {delimiter!r}; use 'comma' or 'space'")
    field = "prompt" if prompt_type == "positive" else "negative_prompt"
    text = getattr(req, field)
    parts = text.split("|")
    seed = random.randrange(MAX_SEED) if req.seed == -1 else req.seed
    cells = [build(req.model_copy(update={field: p, "seed": seed + (i if different_seeds else 0), "batch_size": 1,
                                          "n_iter": 1, "script_name": None, "script_args": []}), settings)
             for i, p in enumerate(matrix_prompts(text, put_at_start, ", " if delimiter == "comma" else " "))]

    def finish(outcomes: list[Outcome]) -> Outcome:
        out = _concat(outcomes)
        if len(out.images) != len(cells):            # interrupted: the images made, no grid
            return out
        w, h = out.images[0].size
        grid = grids.image_grid(out.images, rows=1 << ((len(parts) - 1) // 2))
        grid = grids.prompt_matrix(grid, w, h, parts, int(margin or 0))
        out.images.insert(0, grid)
        out.infotexts.insert(0, out.infotexts[0])
        out.first = 1
        return out
    return cells, list(range(len(cells))), finish


def parse_line(line: str) -> dict:
    """A line of "Prompts from file or textbox": ``--tag value`` pairs (``--prompt`` and
    ``--negative_prompt`` take every word up to the next ``--``), or the whole line as the prompt."""
    if "--" not in line:
        return {"prompt": line}
    try:
        args = shlex.split(line)
    except ValueError as e:
        raise InvalidRequest(f"script_args: line {line!r}: {e}") from None
    out, pos = {}, 0
    while pos < len(args):
        tag = args[pos][2:]
        if not args[pos].startswith("--") or pos + 1 >= len(args):
            raise InvalidRequest(f"script_args: line {line!r}: expected '--option value' at {args[pos]!r}")
        if tag in REFUSED_TAGS or tag not in TAGS:
            why = REFUSED_TAGS.get(tag, f"options are {', '.join(TAGS)}")
            raise InvalidRequest(f"script_args: line {line!r}: option --{tag} is not accepted ({why})")
        if tag in ("prompt", "negative_prompt"):
            end = next((i for i in range(pos + 2, len(args)) if args[i].startswith("--")), len(args))
            out[tag], pos = " ".join(args[pos + 1:end]), end
            continue
        try:
            out[tag] = TAGS[tag](args[pos + 1])
        except ValueError:
            raise InvalidRequest(f"script_args: line {line!r}: --{tag} {args[pos + 1]!r} is not valid") from None
        pos += 2
    return out


def file_plan(req: Processing, settings: dict, build: Callable[[Processing, dict], Generation], task: str):
    iterate, same_seed, position, text = arguments(req.script_args, FILE_TITLE, FILE_NAMES, FILE_DEFAULTS)
    if position not in ("start", "end"):
        raise InvalidRequest(f"script_args: prompt_position must be 'start' or 'end', not {position!r}")
    if not isinstance(text, str):
        raise InvalidRequest("script_args: prompt_txt must be a string of lines")
    jobs = [parse_line(line) for line in (line.strip() for line in text.splitlines()) if line]
    if not jobs:
        raise InvalidRequest("script_args: prompt_txt has no prompts (one per line)")
    seed = req.seed
    if (iterate or same_seed) and seed == -1:
        seed = random.randrange(MAX_SEED)
    cells = []
    for job in jobs:
        update = {"script_name": None, "script_args": [], "seed": seed}
        update |= {k: v for k, v in job.items() if k not in ("sd_model", "prompt_for_display")}
        for field in ("prompt", "negative_prompt"):
            if job.get(field) and getattr(req, field):
                ours, theirs = job[field], getattr(req, field)
                update[field] = f"{ours} {theirs}" if position == "start" else f"{theirs} {ours}"
        cell_settings = {**settings, "sd_model_checkpoint": job["sd_model"]} if "sd_model" in job else settings
        cells.append(build(req.model_copy(update=update), cell_settings))
        if iterate:
            seed += req.batch_size * req.n_iter

    def finish(outcomes: list[Outcome]) -> Outcome:
        return _concat(outcomes)
    return cells, list(range(len(cells))), finish


def _concat(outcomes: list[Outcome]) -> Outcome:
    out = Outcome()
    for o in outcomes:
        out.images += o.images
        out.infotexts += o.infotexts
        out.seeds += o.seeds
        out.prompts += o.prompts
        out.negative_prompts += o.negative_prompts
    out.clip_skip = next((o.clip_skip for o in outcomes if o.images), 1)
    return out
