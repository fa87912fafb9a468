"""txt2img, img2img and inpainting as thin compositions of: encode prompt, noise, sample, decode.

Everything here is NumPy over ``Runtime`` objects; no backend and no torch is imported.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import InvalidRequest
from ..runtimes.base import Runtime, Timed
from ..specs import VAE_FACTOR
from . import images, samplers, schedules
from .denoisers import Denoise, ModelDenoiser, guided, masked
from .rng import make_generator
from .tokenizer import ClipTokenizer

MAX_SEED = 4294967294          # A1111 draws random seeds below this


@dataclass
class Models:
    """The loaded components of one export and the facts the pipeline needs about them."""
    name: str
    arch: dict
    scheduler_config: dict
    tokenizer: ClipTokenizer
    text_encoder: Runtime
    unet: Runtime
    vae_decoder: Runtime
    vae_encoder: Runtime | None = None


@dataclass
class Result:
    """Generated images with their seeds and A1111 infotexts; iterates over the images."""
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    parameters: dict
    timings: dict[str, float] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]

    def save(self, path: str, index: int = 0) -> None:
        images.save_png(self.images[index], path, self.infotexts[index])


@dataclass(frozen=True)
class Request:
    """The parameters every task shares. Seeds: image i uses ``seed + i`` (A1111); -1/None draws one."""
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "Euler a"
    scheduler: str | None = None
    seed: int | None = None
    batch_size: int = 1
    rng: str = "cpu"
    latents: np.ndarray | None = None
    strength: float = 1.0

    def check(self, vae_factor: int) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InvalidRequest("prompt and negative_prompt must be strings")
        if self.width % vae_factor or self.height % vae_factor or self.width < 8 or self.height < 8:
            raise InvalidRequest(f"width and height have to be positive multiples of {vae_factor} "
                                 f"but are {self.width} and {self.height}")
        if not 1 <= self.steps <= 1000:
            raise InvalidRequest(f"steps must be between 1 and 1000, not {self.steps}")
        if not 0.0 <= self.strength <= 1.0:
            raise InvalidRequest(f"strength (denoising strength) must be in [0, 1], not {self.strength}")
        if self.batch_size < 1:
            raise InvalidRequest(f"batch_size must be >= 1, not {self.batch_size}")


@dataclass
class Start:
    """What a task hands the shared loop: start latents (VE) and how to condition and finish sampling."""
    x: np.ndarray
    concat: np.ndarray | None = None                       # 9-channel UNet: mask ⊕ masked-image latents
    wrap: Callable[[Denoise], Denoise] | None = None       # e.g. the 4-channel inpaint blend
    finish: Callable[[np.ndarray], np.ndarray] | None = None   # applied to the final VP latents


class StableDiffusion:
    """A loaded export. ``txt2img``/``img2img``/``inpaint`` return a :class:`Result`."""

    def __init__(self, models: Models, progress: bool = True):
        self.models = models
        self.progress = progress
        self.factor = models.arch.get("vae_factor", VAE_FACTOR)        # pixels per latent cell
        alphas = schedules.alphas_cumprod(models.scheduler_config)
        self.log_sigmas = np.log(np.sqrt((1.0 - alphas) / alphas))

    def txt2img(self, prompt: str, **kwargs) -> Result:
        """Text to image. Keyword arguments are the fields of :class:`Request`."""
        req = self._request(prompt, kwargs)
        return self._generate(req, "txt2img", lambda gens, plan: Start(self._noise(req, gens) * plan.init_sigma))

    def img2img(self, image: Image.Image, prompt: str, strength: float = 0.75, **kwargs) -> Result:
        """Image to image: ``strength`` of the schedule is run from the noised image latents."""
        req = self._request(prompt, {"width": image.width, "height": image.height, **kwargs, "strength": strength})
        pixels = images.to_array(image, req.width, req.height)

        def start(gens, plan):
            x0 = self._encode(pixels, gens)
            return Start(x0 + plan.sigmas[0] * self._noise(req, gens))
        return self._generate(req, "img2img", start)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, strength: float = 1.0,
                **kwargs) -> Result:
        """Repaint where ``mask`` is white: a 9-channel inpainting UNet, or mask blending on a 4-channel one."""
        if image.size != mask.size:
            raise InvalidRequest(f"mask is {mask.width}x{mask.height} but the image is "
                                 f"{image.width}x{image.height}; they must be the same size")
        req = self._request(prompt, {"width": image.width, "height": image.height, **kwargs, "strength": strength})
        pixels = images.to_array(image, req.width, req.height)
        mask = images.mask_array(mask, req.width, req.height)
        return self._generate(req, "inpaint", lambda gens, plan: self._inpaint_start(req, pixels, mask, gens, plan))

    def _inpaint_start(self, req, pixels, mask, gens, plan) -> Start:
        """diffusers' order of draws: image latents (4-ch or strength < 1), noise, masked-image latents."""
        nine = self.models.arch.get("unet_in_channels", 4) == 9
        full = req.strength == 1.0
        x0 = self._encode(pixels, gens) if (not nine or not full) else None
        noise = self._noise(req, gens)
        x = noise * plan.init_sigma if full else x0 + plan.sigmas[0] * noise
        masked_latents = self._encode(pixels * (mask < 0.5), gens)
        m = mask[:, :, ::self.factor, ::self.factor]   # nearest-neighbour downscale, as torch's interpolate
        if nine:
            return Start(x, concat=np.concatenate([np.repeat(m, len(x), 0), masked_latents], axis=1))
        return Start(x, wrap=lambda d: masked(d, m, x0, noise, float(plan.sigmas[0])),
                     finish=lambda z: m * z + (1.0 - m) * x0)

    # -- shared steps -------------------------------------------------------------------------------

    def _request(self, prompt: str, kwargs: dict) -> Request:
        try:
            req = Request(prompt, **kwargs)
        except TypeError as e:
            raise InvalidRequest(str(e)) from None
        req.check(self.factor)
        if req.seed is None or req.seed == -1:
            req = replace(req, seed=random.randrange(MAX_SEED))
        return req

    def _generate(self, req: Request, task: str, prepare: Callable) -> Result:
        """Plan the schedule, encode the prompts, prepare the start, sample, decode."""
        m = self.models
        spent = _spent(m)
        began = time.perf_counter()
        plan = samplers.plan(req.sampler, req.steps, m.scheduler_config, strength=req.strength,
                             scheduler=req.scheduler)
        gens = [make_generator(req.rng, req.seed + i) for i in range(req.batch_size)]
        cond = self._cond(req)
        start = prepare(gens, plan)
        concat = None if start.concat is None else np.concatenate([start.concat] * (len(cond) // len(start.x)))
        d = ModelDenoiser(m.unet, self.log_sigmas, cond, m.arch.get("prediction_type", "epsilon"), concat)
        d = guided(d, req.guidance_scale) if req.guidance_scale > 1.0 else d
        d = start.wrap(d) if start.wrap else d
        with _progress(len(plan.sigmas) - 1, self.progress) as bar:
            x = plan.run(d, start.x.astype(np.float32), noise=lambda: _draw(gens, start.x.shape),
                         callback=lambda i, x, denoised: bar.update(1))
        latents = (x / np.sqrt(1.0 + float(plan.sigmas[-1]) ** 2)).astype(np.float32)
        latents = start.finish(latents) if start.finish else latents
        pics = self._decode(latents)
        timings = {k: v - spent.get(k, 0.0) for k, v in _spent(m).items()}
        timings["total"] = time.perf_counter() - began
        return self._result(req, task, plan, pics, timings)

    def _cond(self, req: Request) -> np.ndarray:
        """Text embeddings, [uncond * B; cond * B] with guidance, cond * B without (diffusers' order)."""
        prompts = [req.negative_prompt, req.prompt] if req.guidance_scale > 1.0 else [req.prompt]
        ids = self.models.tokenizer(prompts)
        emb = self.models.text_encoder.run({"input_ids": ids})["last_hidden_state"].astype(np.float32)
        return np.repeat(emb, req.batch_size, axis=0)

    def _noise(self, req: Request, gens) -> np.ndarray:
        """Initial noise: ``req.latents`` when given, else one draw per image from its own generator."""
        shape = (req.batch_size, self.models.arch["latent_channels"], req.height // self.factor,
                 req.width // self.factor)
        if req.latents is None:
            return _draw(gens, shape)
        latents = np.asarray(req.latents, dtype=np.float32)
        if latents.shape != shape:
            raise InvalidRequest(f"latents have shape {latents.shape}, expected {shape}")
        return latents

    def _encode(self, pixels: np.ndarray, gens) -> np.ndarray:
        """VAE-encode and sample the latent distribution with each image's generator (diffusers' order)."""
        if self.models.vae_encoder is None:
            raise InvalidRequest("this export has no VAE encoder, which img2img and inpainting need; "
                                 "re-export the model with `sdrt export`")
        params = self.models.vae_encoder.run({"sample": pixels})["latent_parameters"].astype(np.float32)
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        samples = [mean + std * g.randn(mean.shape) for g in gens]
        return np.concatenate(samples) * np.float32(self.models.arch["vae_scaling_factor"])

    def _decode(self, latents: np.ndarray) -> list[Image.Image]:
        z = latents / np.float32(self.models.arch["vae_scaling_factor"])
        return [pic for i in range(len(z))
                for pic in images.to_pil(self.models.vae_decoder.run({"latent_sample": z[i:i + 1]})["sample"])]

    def _result(self, req: Request, task: str, plan, pics, timings) -> Result:
        seeds = [req.seed + i for i in range(len(pics))]
        params = {"Steps": req.steps, "Sampler": plan.label, "CFG scale": req.guidance_scale, "Seed": None,
                  "Size": f"{req.width}x{req.height}", "Model": self.models.name,
                  "Denoising strength": req.strength if task != "txt2img" else None,
                  "RNG": {"cpu": None, "nv": "NV", "numpy": "NumPy"}.get(req.rng)}
        texts = [images.infotext(req.prompt, req.negative_prompt, {**params, "Seed": s}) for s in seeds]
        parameters = {"task": task, **{k: v for k, v in req.__dict__.items() if k != "latents"}}
        return Result(pics, seeds, texts, parameters, timings)


def _draw(gens, shape) -> np.ndarray:
    """One standard-normal draw per image, each from that image's generator (diffusers' generator list)."""
    return np.concatenate([g.randn((1, *shape[1:])) for g in gens])


def _spent(models: Models) -> dict[str, float]:
    return {k: r.seconds for k in ("text_encoder", "unet", "vae_encoder", "vae_decoder")
            if isinstance(r := getattr(models, k), Timed)}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="sampling", unit="step", disable=None if enabled else True, leave=False)
