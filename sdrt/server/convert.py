"""A1111 request bodies -> sdrt pipeline calls, and sdrt results -> A1111 response bodies.

Fields sdrt does not honour yet are refused with a 422 naming them (see ``_refuse_unsupported``), never
silently ignored; fields that only tune other models or UIs (``image_cfg_scale`` of instruct-pix2pix, ``eta``,
``do_not_save_*``) are accepted as A1111 accepts them for a plain SD model.
"""
from __future__ import annotations

import base64
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from .. import __version__
from ..errors import InvalidRequest
from ..pipelines import images, masking, samplers
from ..pipelines.pipeline import MAX_SEED, Hires
from . import controlnet
from . import options as opts
from .checkpoints import Checkpoint
from .codec import decode_image, encode_png
from .jobs import Interrupted, Job, Skipped
from .schemas import Img2Img, Processing, Txt2Img

# A1111's schedule types (sd_schedulers.py): name -> label; sdrt runs automatic, uniform, karras and
# sgm_uniform (as diffusers' "trailing" timestep spacing, SD-Turbo's schedule)
SCHEDULES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
             "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
             "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM",
             "beta": "Beta"}
SUPPORTED_SCHEDULES = ("automatic", "uniform", "karras", "sgm_uniform")
# A1111 >= 1.9: a sampler's own schedule when the request says "Automatic" (exponential is not in sdrt:
# DPM++ 2M SDE then runs its uniform schedule, and says so in the infotext)
DEFAULT_SCHEDULE = {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM2": "karras", "DPM2 a": "karras"}
MAX_MASK_BLUR = 64                                                         # px, A1111's slider maximum


class NotFound(InvalidRequest):
    """A named thing (sampler, init image) does not exist: A1111 answers these with 404 and a short detail."""

    def __init__(self, detail: str, message: str):
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; over a limit is a 422 naming the field."""
    max_pixels: int = 2048 * 2048          # width * height (and the hires target)
    max_steps: int = 150
    max_images: int = 16                   # batch_size * n_iter
    max_body_bytes: int = 64 << 20


@dataclass
class Generation:
    """A validated request: ``call(pipe, seed, callback, preview)`` runs one batch; ``finish`` post-processes
    each image (the inpainting overlay). ``batch_kwargs``: for a txt2img without ControlNet or hires fix, the
    pipeline arguments besides prompt, negative prompt, seed and batch size (see ``batching``)."""
    task: str
    checkpoint: Checkpoint
    call: Callable
    seed: int
    subseed: int
    batch_size: int
    n_iter: int
    info: dict
    parameters: dict
    send_images: bool
    save_images: bool
    finish: Callable[[Image.Image], Image.Image] = field(default=lambda image: image)
    extra_images: list[Image.Image] = field(default_factory=list)    # ControlNet detected maps
    batch_kwargs: dict | None = None


@dataclass
class Outcome:
    """What a job made: images with their infotexts (grids first, before ``first``), and the seeds and
    prompts of the generated images (A1111's ``all_seeds`` etc., which leave grids out)."""
    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    clip_skip: int = 1
    first: int = 0                                        # A1111's index_of_first_image


def sampler(name: str | None, scheduler: str | None) -> tuple[str, str]:
    """A1111 ``sampler_name`` + ``scheduler`` -> (sdrt sampler name, A1111 schedule label).

    As A1111's ``get_sampler_and_scheduler``: a legacy suffix ("DPM++ 2M Karras") wins over the field;
    "Automatic" means the sampler's own default (Karras for DPM++ 2M, DPM++ SDE, DPM2, DPM2 a).
    """
    text, kind = (name or "").strip(), _schedule(scheduler)
    for key, label in SCHEDULES.items():
        if key != "automatic" and text.lower().endswith(" " + label.lower()):
            text, kind = text[: -len(label) - 1], key
            break
    try:
        base = samplers.resolve_name(text)
    except InvalidRequest:
        raise NotFound("Sampler not found", f"sampler {name!r} not found; sdrt has: "
                       f"{', '.join(samplers.BASE_NAMES)}") from None
    if kind == "automatic":
        kind = DEFAULT_SCHEDULE.get(base, "uniform")
    if kind not in SUPPORTED_SCHEDULES:
        raise InvalidRequest(f"scheduler {SCHEDULES[kind]!r} is not supported by sdrt; use one of: "
                             f"{', '.join(SCHEDULES[k] for k in SUPPORTED_SCHEDULES)}")
    return samplers.resolve_name(base, kind if kind in ("karras", "sgm_uniform") else None), SCHEDULES[kind]


def _schedule(scheduler: str | None) -> str:
    text = (scheduler or "automatic").strip().lower().replace(" ", "_")
    text = {"sgmuniform": "sgm_uniform"}.get(text, text)
    by_label = {label.lower().replace(" ", "_"): key for key, label in SCHEDULES.items()}
    if text not in SCHEDULES and text not in by_label:
        raise InvalidRequest(f"unknown scheduler {scheduler!r}; A1111's are: {', '.join(SCHEDULES.values())}")
    return by_label.get(text, text)


def check_limits(req: Processing, limits: Limits) -> None:
    checks = [("width*height", req.width * req.height, limits.max_pixels), ("steps", req.steps, limits.max_steps),
              ("batch_size*n_iter", req.batch_size * req.n_iter, limits.max_images)]
    if isinstance(req, Txt2Img) and req.enable_hr:
        w, h = req.hr_resize_x or req.width * req.hr_scale, req.hr_resize_y or req.height * req.hr_scale
        checks += [("hr_resize_x*hr_resize_y (hires target)", int(w * h), limits.max_pixels),
                   ("hr_second_pass_steps", req.hr_second_pass_steps, limits.max_steps)]
    for name, value, limit in checks:
        if value > limit:
            raise InvalidRequest(f"{name} is {value}; this server allows at most {limit}")
    if req.width < 1 or req.height < 1:
        raise InvalidRequest(f"width and height must be positive, not {req.width} and {req.height}")
    if req.batch_size < 1 or req.n_iter < 1:
        raise InvalidRequest(f"batch_size and n_iter must be >= 1, not {req.batch_size} and {req.n_iter}")


def _refuse_unsupported(req: Processing) -> None:
    """Fields with a meaning sdrt does not implement yet: a 422 naming them beats a different image."""
    unsupported = {
        "subseed_strength (variation seeds)": req.subseed_strength not in (0, None),
        "seed_resize_from_w/h": max(req.seed_resize_from_w, req.seed_resize_from_h) > 0,
        "styles": bool(req.styles), "restore_faces": bool(req.restore_faces),
        "refiner_checkpoint": bool(req.refiner_checkpoint), "firstpass_image": bool(req.firstpass_image),
        "infotext": bool(req.infotext), "s_churn": bool(req.s_churn),
        "s_noise": req.s_noise not in (None, 1, 1.0),
    }
    if isinstance(req, Img2Img):
        unsupported |= {"latent_mask": bool(req.latent_mask),
                        "initial_noise_multiplier": req.initial_noise_multiplier not in (None, 1, 1.0)}
    if isinstance(req, Txt2Img):
        unsupported["hr_checkpoint_name"] = bool(req.hr_checkpoint_name)
    named = [name for name, used in unsupported.items() if used]
    if named:
        raise InvalidRequest(f"sdrt does not support {', '.join(named)} yet; leave them at their defaults")


def _common(req: Processing, settings: dict) -> tuple[dict, int, int]:
    """Pipeline keyword arguments every task takes, and the resolved seed and subseed."""
    _refuse_unsupported(req)
    name, schedule = sampler(req.sampler_name or req.sampler_index, req.scheduler)
    kwargs = dict(negative_prompt=req.negative_prompt, steps=req.steps, guidance_scale=req.cfg_scale,
                  sampler=name, batch_size=req.batch_size, **opts.pipeline_settings(settings))
    if schedule == SCHEDULES["sgm_uniform"]:
        kwargs["scheduler"] = "sgm_uniform"
    kwargs["tiling"] = bool(req.tiling)          # an export without tiling graphs answers 422
    seed = random.randrange(MAX_SEED) if req.seed == -1 else req.seed
    subseed = random.randrange(MAX_SEED) if req.subseed == -1 else req.subseed
    return kwargs, seed, subseed


def txt2img(req: Txt2Img, settings: dict, checkpoint: Checkpoint) -> Generation:
    kwargs, seed, subseed = _common(req, settings)
    kwargs |= dict(width=req.width, height=req.height)
    controls, maps = controlnet.units(req.alwayson_scripts, checkpoint, req.width, req.height)
    if controls:
        kwargs["control"] = controls
    hires = None
    if req.enable_hr:
        hr_sampler = sampler(req.hr_sampler_name, req.hr_scheduler)[0] if req.hr_sampler_name else None
        hires = Hires(scale=req.hr_scale, width=req.hr_resize_x, height=req.hr_resize_y,
                      upscaler=req.hr_upscaler or "Latent", steps=req.hr_second_pass_steps,
                      strength=0.75 if req.denoising_strength is None else req.denoising_strength,
                      sampler=hr_sampler, prompt=req.hr_prompt or None, negative_prompt=req.hr_negative_prompt or None)

    def call(pipe, seed, callback, preview):
        return pipe.txt2img(req.prompt, hires=hires, seed=seed, callback=callback, preview=preview, **kwargs)
    gen = _generation("txt2img", req, checkpoint, call, seed, subseed, req.model_dump(), extra_images=maps)
    if not controls and hires is None:
        gen.batch_kwargs = {k: v for k, v in kwargs.items() if k not in ("negative_prompt", "batch_size")}
    return gen


def img2img(req: Img2Img, settings: dict, checkpoint: Checkpoint) -> Generation:
    """img2img, or inpainting with ``mask``; the image is resized to width x height by ``resize_mode``."""
    if not req.init_images:
        raise NotFound("Init image not found", "init_images: give one base64 image")
    if len(req.init_images) > 1:
        raise InvalidRequest("init_images: sdrt takes one init image per request")
    mode = images.resize_mode(req.resize_mode)
    kwargs, seed, subseed = _common(req, settings)
    image = decode_image(req.init_images[0], "init_images[0]").convert("RGB")
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    controls, maps = controlnet.units(req.alwayson_scripts, checkpoint, req.width, req.height, image)
    if controls:
        kwargs["control"] = controls
    parameters = req.model_dump()
    if not req.include_init_images:
        parameters |= {"init_images": None, "mask": None}
    kwargs |= dict(width=req.width, height=req.height, resize_mode=mode)
    if req.mask is None:
        def call(pipe, seed, callback, preview):
            return pipe.img2img(image, req.prompt, strength=strength, seed=seed, callback=callback, preview=preview,
                                **kwargs)
        return _generation("img2img", req, checkpoint, call, seed, subseed, parameters, extra_images=maps)
    mask, options, overlay = _inpaint_inputs(req, image, mode)
    kwargs |= options

    def call(pipe, seed, callback, preview):
        return pipe.inpaint(image, mask, req.prompt, strength=strength, seed=seed, callback=callback, preview=preview,
                            **kwargs)
    return _generation("inpaint", req, checkpoint, call, seed, subseed, parameters, overlay, maps)


def _inpaint_inputs(req: Img2Img, image: Image.Image, mode: int):
    """The mask, the pipeline's inpainting options, and for "Whole picture" the overlay that pastes the result
    over the resized original through the doubled blurred mask, as A1111 does ("Only masked" results come back
    pasted by the pipeline)."""
    mask = decode_image(req.mask, "mask")
    if mask.size != image.size:
        raise InvalidRequest(f"mask is {mask.width}x{mask.height} but init_images[0] is "
                             f"{image.width}x{image.height}; they must be the same size")
    if mode == 3:
        raise InvalidRequest("resize_mode 3 (Just resize (latent upscale)) is not supported for inpainting; "
                             "use 0, 1 or 2")
    blur = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
    if not all(0 <= b <= MAX_MASK_BLUR for b in blur):
        raise InvalidRequest(f"mask_blur (x, y) is {blur}; give values from 0 to {MAX_MASK_BLUR} pixels")
    options = dict(mask_blur=blur[0] if blur[0] == blur[1] else blur, fill=masking.fill_mode(req.inpainting_fill),
                   invert_mask=bool(req.inpainting_mask_invert), only_masked=bool(req.inpaint_full_res),
                   padding=req.inpaint_full_res_padding)
    if req.inpaint_full_res:
        return mask, options, None
    prepared = masking.prepare(mask, blur, bool(req.inpainting_mask_invert))
    cover = masking.overlay_mask(images.resize_image(prepared, mode, req.width, req.height))
    base = images.resize_image(image, mode, req.width, req.height)

    def overlay(generated: Image.Image) -> Image.Image:
        return masking.paste(generated, base, cover)
    return mask, options, overlay


def _generation(task, req: Processing, checkpoint, call, seed, subseed, parameters, finish=None,
                extra_images=()) -> Generation:
    info = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "subseed_strength": req.subseed_strength,
            "width": req.width, "height": req.height, "sampler_name": req.sampler_name or req.sampler_index,
            "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size, "restore_faces": False,
            "face_restoration_model": None, "sd_model_name": checkpoint.model_name,
            "sd_model_hash": checkpoint.hash, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": req.denoising_strength if task != "txt2img" or req.enable_hr else None,
            "extra_generation_params": {}, "index_of_first_image": 0, "styles": req.styles or [],
            "is_using_inpainting_conditioning": task == "inpaint", "version": f"sdrt {__version__}"}
    gen = Generation(task, checkpoint, call, seed, subseed, req.batch_size, req.n_iter, info, parameters,
                     req.send_images, req.save_images, extra_images=list(extra_images))
    if finish is not None:
        gen.finish = finish
    return gen


def execute(gen: Generation, pipe, job: Job, save_dir: Path | None) -> dict:
    """Run ``gen`` in the worker and answer with its images, then the ControlNet detected maps."""
    out = run(gen, pipe, job)
    if out.images:
        out.images += gen.extra_images
    return respond(gen, out, job, save_dir)


def run(gen: Generation, pipe, job: Job, first_batch: int = 0) -> Outcome:
    """Run ``gen`` batch by batch (``first_batch`` numbers them within a script's job); /skip drops a batch,
    /interrupt ends the job early keeping the images made so far (as A1111 does)."""
    out = Outcome()
    for n in range(gen.n_iter):
        job.begin_batch(first_batch + n)
        try:
            result = gen.call(pipe, gen.seed + n * gen.batch_size, job.step, job.show)
        except Skipped:
            continue
        except Interrupted:
            break
        out.images += [gen.finish(image) for image in result.images]
        out.infotexts += result.infotexts
        out.seeds += result.seeds
        out.prompts += [gen.info["prompt"]] * len(result.images)
        out.negative_prompts += [gen.info["negative_prompt"]] * len(result.images)
        out.clip_skip = result.parameters["clip_skip"]
    return out


def respond(gen: Generation, out: Outcome, job: Job, save_dir: Path | None) -> dict:
    """The A1111 response body; images past the infotexts (detected maps) carry none."""
    texts = out.infotexts + [""] * (len(out.images) - len(out.infotexts))
    stamp = time.strftime("%Y%m%d%H%M%S")
    if gen.save_images and save_dir is not None:
        for i, (image, text) in enumerate(zip(out.images, texts)):
            seed = f"-{out.seeds[i - out.first]}" if 0 <= i - out.first < len(out.seeds) else ""
            (save_dir / f"{stamp}-{''.join(filter(str.isalnum, job.id))}-{i:02d}{seed}.png").write_bytes(
                base64.b64decode(encode_png(image, text)))
    info = {**gen.info, "all_prompts": out.prompts, "all_negative_prompts": out.negative_prompts,
            "seed": out.seeds[0] if out.seeds else gen.seed, "all_seeds": out.seeds,
            "subseed": gen.subseed, "all_subseeds": [gen.subseed + i for i in range(len(out.seeds))],
            "index_of_first_image": out.first, "infotexts": out.infotexts, "job_timestamp": stamp,
            "clip_skip": out.clip_skip}
    images = [encode_png(image, text) for image, text in zip(out.images, texts)] if gen.send_images else []
    return {"images": images, "parameters": gen.parameters, "info": json.dumps(info)}


def png_info(data: str) -> dict:
    """POST /png-info: the infotext in an image's 'parameters' chunk, parsed into items as A1111 does."""
    image = decode_image(data, "image")
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": parse_infotext(text)}


def parse_infotext(text: str) -> dict:
    """A1111's generation-parameters text -> {"Prompt", "Negative prompt", "Steps", ...} (values as strings,
    quoted values unquoted)."""
    if not text:
        return {}
    *head, last = text.strip().split("\n")
    if "Steps: " not in last:                     # no parameter line: everything is prompt
        head, last = [*head, last], ""
    prompt = [line for line in head if not line.startswith("Negative prompt:")]
    negative = [line[len("Negative prompt:"):].strip() for line in head if line.startswith("Negative prompt:")]
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    decoder = json.JSONDecoder()
    rest = last
    while rest:
        key, _, rest = rest.partition(": ")
        if rest.startswith('"'):
            value, end = decoder.raw_decode(rest)
            rest = rest[end:]
        else:
            value, _, rest = rest.partition(",")
            value = value.strip()
        out[key.strip()] = value
        rest = rest.lstrip(",").lstrip()
    return out
