"""A1111's "X/Y/Z plot" script (``scripts/xyz_grid.py``, v1.10) through ``script_name``/``script_args``.

``script_args`` is the script's ``run`` signature after ``p``: x_type, x_values, x_values_dropdown, y_type,
y_values, y_values_dropdown, z_type, z_values, z_values_dropdown, draw_legend, include_lone_images,
include_sub_grids, no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode (missing
trailing arguments take the UI's defaults). An axis type is A1111's index into its txt2img or img2img axis
list (1 = Seed, 4 = Steps, ...), or the axis label itself. sdrt plots Nothing, Seed, Steps, CFG Scale,
Prompt S/R, Sampler, Checkpoint name and Denoising; other axes are refused by name. Each cell is one
generation (batch_size and n_iter 1). The answer is A1111's: the grid, the sub-grids with
include_sub_grids, the cell images with include_lone_images; ``infotexts`` has the grid's (with the Script
and axis fields) and every cell's.
"""
from __future__ import annotations

import csv
import itertools
import json
import random
import re
from dataclasses import dataclass
from io import StringIO
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..errors import InvalidRequest
from ..pipelines.pipeline import MAX_SEED
from . import grids
from .convert import Generation, Outcome
from .schemas import Processing

TITLE = "X/Y/Z plot"
# A1111 v1.10's axis_options, as its txt2img and img2img UIs list them (the API's axis type is an index here)
_AXES = [("Nothing", ""), ("Seed", ""), ("Var. seed", ""), ("Var. strength", ""), ("Steps", ""),
         ("Hires steps", "txt2img"), ("CFG Scale", ""), ("Image CFG Scale", "img2img"), ("Prompt S/R", ""),
         ("Prompt order", ""), ("Sampler", "txt2img"), ("Hires sampler", "txt2img"), ("Sampler", "img2img"),
         ("Checkpoint name", ""), ("Negative Guidance minimum sigma", ""), ("Sigma Churn", ""), ("Sigma min", ""),
         ("Sigma max", ""), ("Sigma noise", ""), ("Schedule type", ""), ("Schedule min sigma", ""),
         ("Schedule max sigma", ""), ("Schedule rho", ""), ("Beta schedule alpha", ""), ("Beta schedule beta", ""),
         ("Eta", ""), ("Clip skip", ""), ("Denoising", ""), ("Initial noise multiplier", ""), ("Extra noise", ""),
         ("Hires upscaler", "txt2img"), ("Cond. Image Mask Weight", "img2img"), ("VAE", ""), ("Styles", ""),
         ("UniPC Order", ""), ("Face restore", ""), ("Token merging ratio", ""),
         ("Token merging ratio high-res", ""), ("Always discard next-to-last sigma", ""),
         ("SGM noise multiplier", ""), ("Refiner checkpoint", ""), ("Refiner switch at", ""), ("RNG source", ""),
         ("FP8 mode", ""), ("Size", "")]
AXES = {task: [label for label, only in _AXES if only in ("", task)] for task in ("txt2img", "img2img")}
FIELDS = {"Seed": ("seed", int), "Steps": ("steps", int), "CFG Scale": ("cfg_scale", float),
          "Sampler": ("sampler_name", str), "Denoising": ("denoising_strength", float)}
SUPPORTED = ("Nothing", *FIELDS, "Prompt S/R", "Checkpoint name")
CHOICES = ("Sampler", "Checkpoint name")            # axes whose values come from the dropdown unless csv_mode
COST = {"Checkpoint name": 1.0}                     # the costliest axis changes least often (outermost loop)
MAX_VALUES = 10_000                                 # per axis: ranges like 1-1000000000 are refused, not expanded
DEFAULTS = [1, "", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]
NAMES = ["x_type", "x_values", "x_values_dropdown", "y_type", "y_values", "y_values_dropdown", "z_type",
         "z_values", "z_values_dropdown", "draw_legend", "include_lone_images", "include_sub_grids",
         "no_fixed_seeds", "vary_seeds_x", "vary_seeds_y", "vary_seeds_z", "margin_size", "csv_mode"]
ARGS = tuple({"label": name, "value": value, "minimum": None, "maximum": None, "step": None,
              "choices": None} for name, value in zip(NAMES, DEFAULTS))
RANGE_INT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
RANGE_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
COUNT_INT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
COUNT_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


@dataclass(frozen=True)
class Axis:
    name: str                 # "X", "Y" or "Z"
    label: str
    values: list
    text: str                 # the values as sent (the infotext's "X Values")

    def caption(self, value) -> str:
        """A1111's axis label of a value: "Seed: 5"; the bare value for prompts, samplers, checkpoints."""
        if self.label == "Nothing":
            return ""
        value = round(value, 8) if isinstance(value, float) else value
        return str(value) if self.label in ("Prompt S/R", *CHOICES) else f"{self.label}: {value}"


def plan(req: Processing, settings: dict, build: Callable[[Processing, dict], Generation], task: str):
    """The plot's cells as generations (index ``ix + iy*nx + iz*nx*ny``), their run order and the function
    that turns their outcomes into the answer."""
    args = arguments(req.script_args)
    if req.batch_size != 1 or req.n_iter != 1:
        raise InvalidRequest("X/Y/Z plot: sdrt makes one image per cell; send batch_size 1 and n_iter 1")
    axes = [_axis(name, args[3 * i], args[3 * i + 1], args[3 * i + 2], args[17], task)
            for i, name in enumerate("XYZ")]
    fixed = not args[12]
    if fixed:
        req = req.model_copy(update={"seed": random.randrange(MAX_SEED) if req.seed == -1 else req.seed})
        axes = [_fixed_seeds(axis) for axis in axes]
    vary_x, vary_y, vary_z = args[13:16]
    x, y, z = axes
    xdim, ydim = len(x.values) if vary_x else 1, len(y.values) if vary_y else 1
    cells = []
    for iz, iy, ix in itertools.product(*(range(len(axis.values)) for axis in (z, y, x))):
        update, cell_settings = {"script_name": None, "script_args": []}, dict(settings)
        for axis, i in zip(axes, (ix, iy, iz)):
            _apply(axis, axis.values[i], req, update, cell_settings)
        offset = (ix if vary_x else 0) + (iy * xdim if vary_y else 0) + (iz * xdim * ydim if vary_z else 0)
        if offset:
            update["seed"] = update.get("seed", req.seed) + offset
        cells.append(build(req.model_copy(update=update), cell_settings))
    costly = max(range(3), key=lambda i: (COST.get(axes[i].label, 0.0), i))   # ties: Z outermost, as A1111
    order = sorted(range(len(cells)), key=lambda k: _position(k, axes, costly))

    def finish(outcomes: list[Outcome]) -> Outcome:
        return _answer(outcomes, axes, args, fixed)
    return cells, order, finish


def arguments(script_args: list[Any]) -> list[Any]:
    if len(script_args) > len(DEFAULTS):
        raise InvalidRequest(f"script_args: X/Y/Z plot takes at most {len(DEFAULTS)} arguments "
                             f"({', '.join(NAMES)}), not {len(script_args)}")
    return list(script_args) + DEFAULTS[len(script_args):]


def _axis(name: str, kind: Any, text: Any, dropdown: Any, csv_mode: bool, task: str) -> Axis:
    where = f"script_args: {name} type"
    labels = AXES[task]
    if isinstance(kind, int) and not isinstance(kind, bool) and 0 <= kind < len(labels):
        label = labels[kind]
    elif isinstance(kind, str) and kind in labels:
        label = kind
    else:
        raise InvalidRequest(f"{where} {kind!r} is not an axis of A1111's {task} X/Y/Z plot: give an index "
                             f"0..{len(labels) - 1} or a label ({', '.join(SUPPORTED)})")
    if label not in SUPPORTED:
        raise InvalidRequest(f"{where}: sdrt does not plot {label!r} yet; it plots {', '.join(SUPPORTED)}")
    if label == "Nothing":
        return Axis(name, label, [0], "")
    if label in CHOICES and not csv_mode:
        if not isinstance(dropdown, list) or not all(isinstance(v, str) for v in dropdown):
            raise InvalidRequest(f"script_args: {name} values dropdown must be a list of names for {label!r} "
                                 "(or send csv_mode true with the values as text)")
        values, text = [v.strip() for v in dropdown], _csv_line(dropdown)
    elif isinstance(text, str):
        values = [v.strip() for v in itertools.chain.from_iterable(csv.reader(StringIO(text)))]
    else:
        raise InvalidRequest(f"script_args: {name} values must be a comma-separated string")
    kind = FIELDS.get(label, (None, str))[1]
    try:
        values = _expand(values, kind)
    except ValueError:
        raise InvalidRequest(f"script_args: {name} values {text!r} are not all {kind.__name__}s (ranges like "
                             f"1-5, 1-9 (+2) or 1-9 [5] are accepted, up to {MAX_VALUES} values)") from None
    if not values:
        raise InvalidRequest(f"script_args: {name} values are empty for the {label!r} axis")
    return Axis(name, label, values, text)


def _csv_line(values: list[str]) -> str:
    with StringIO() as out:
        csv.writer(out).writerow(values)
        return out.getvalue().strip()


def _expand(values: list[str], kind: type) -> list:
    """A1111's ranges: "1-5" (step 1), "1-10 (+3)" (step), "1-10 [4]" (count, evenly spaced); ValueError for
    a value that is not a number or a range of more than MAX_VALUES."""
    if kind is str:
        return values
    step_re, count_re = (RANGE_INT, COUNT_INT) if kind is int else (RANGE_FLOAT, COUNT_FLOAT)
    out = []
    for value in values:
        by_step, by_count = step_re.fullmatch(value), count_re.fullmatch(value)
        if by_step:
            start, end, step = kind(by_step[1]), kind(by_step[2]), kind(by_step[3] or 1)
            if step == 0 or (end - start) / step > MAX_VALUES:
                raise ValueError(value)
            out += list(range(start, end + 1, step)) if kind is int else np.arange(start, end + step, step).tolist()
        elif by_count:
            start, end, n = kind(by_count[1]), kind(by_count[2]), int(by_count[3] or 1)
            if n > MAX_VALUES:
                raise ValueError(value)
            out += [kind(v) for v in np.linspace(start, end, n).tolist()]
        else:
            out.append(kind(value))
        if len(out) > MAX_VALUES:
            raise ValueError(value)
    return out


def _fixed_seeds(axis: Axis) -> Axis:
    if axis.label != "Seed":
        return axis
    return Axis(axis.name, axis.label, [random.randrange(MAX_SEED) if v == -1 else v for v in axis.values], axis.text)


def _apply(axis: Axis, value, req: Processing, update: dict, settings: dict) -> None:
    if axis.label in FIELDS:
        update[FIELDS[axis.label][0]] = value
    elif axis.label == "Prompt S/R":
        search = axis.values[0]
        prompt, negative = update.get("prompt", req.prompt), update.get("negative_prompt", req.negative_prompt)
        if search not in prompt and search not in negative:
            raise InvalidRequest(f"script_args: Prompt S/R did not find {search!r} in prompt or negative prompt")
        update["prompt"], update["negative_prompt"] = prompt.replace(search, value), negative.replace(search, value)
    elif axis.label == "Checkpoint name":
        settings["sd_model_checkpoint"] = value


def _position(k: int, axes: list[Axis], costly: int) -> tuple:
    """Cell ``k``'s place in the run order: the costliest axis outermost, then Z, Y, X."""
    nx, ny = len(axes[0].values), len(axes[1].values)
    index = (k % nx, k // nx % ny, k // (nx * ny))
    return (index[costly], *(index[i] for i in (2, 1, 0) if i != costly))


def _answer(outcomes: list[Outcome], axes: list[Axis], args: list, fixed: bool) -> Outcome:
    x, y, z = axes
    nx, ny, nz = (len(axis.values) for axis in axes)
    done = [o for o in outcomes if o.images]
    if not done:
        return Outcome()
    size = done[0].images[0].size
    pics = [o.images[0] if o.images else Image.new("RGB", size) for o in outcomes]
    draw_legend, lone, sub_grids, margin = bool(args[9]), bool(args[10]), bool(args[11]), int(args[16] or 0)
    subs = []
    for iz in range(nz):
        grid = grids.image_grid(pics[iz * nx * ny:(iz + 1) * nx * ny], rows=ny)
        if draw_legend:
            grid = grids.annotate(grid, size[0], size[1], [[grids.Label(x.caption(v))] for v in x.values],
                                  [[grids.Label(y.caption(v))] for v in y.values], margin)
        subs.append(grid)
    main = grids.image_grid(subs, rows=1)
    if draw_legend:
        main = grids.annotate(main, subs[0].width, subs[0].height, [[grids.Label(z.caption(v))] for v in z.values],
                              [[grids.Label()]])
    first = done[0]
    head = {"Script": TITLE, **_axis_fields(x, fixed), **_axis_fields(y, fixed)}
    texts = [o.infotexts[0] if o.infotexts else "" for o in outcomes]
    grid_texts = [_extend(first.infotexts[0], {**head, **_axis_fields(z, fixed)})]
    grid_texts += [_extend(texts[iz * nx * ny], head) for iz in range(nz)] if sub_grids else []
    return Outcome(images=[main, *(subs if sub_grids else []), *(pics if lone else [])],
                   infotexts=grid_texts + texts, seeds=[o.seeds[0] if o.seeds else None for o in outcomes],
                   prompts=[o.prompts[0] if o.prompts else None for o in outcomes],
                   negative_prompts=[o.negative_prompts[0] if o.negative_prompts else None for o in outcomes],
                   clip_skip=first.clip_skip, first=1 + (nz if sub_grids else 0))


def _axis_fields(axis: Axis, fixed: bool) -> dict:
    if axis.label == "Nothing":
        return {}
    out = {f"{axis.name} Type": axis.label, f"{axis.name} Values": axis.text}
    if axis.label == "Seed" and fixed:
        out[f"Fixed {axis.name} Values"] = ", ".join(str(v) for v in axis.values)
    return out


def _extend(infotext: str, fields: dict) -> str:
    """An infotext with more "Key: value" fields on its parameter line (quoted as A1111 quotes them)."""
    quoted = (json.dumps(str(v), ensure_ascii=False) if any(c in str(v) for c in ",:\n") else str(v)
              for v in fields.values())
    return ", ".join([infotext, *(f"{k}: {v}" for k, v in zip(fields, quoted))])
