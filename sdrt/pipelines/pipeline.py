"""txt2img, img2img and inpainting as thin compositions of: encode prompt, noise, sample, decode.

Everything here is NumPy over ``Runtime`` objects; no backend and no torch is imported.
"""
from __future__ import annotations

import logging
import random
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..errors import InvalidRequest
from ..runtimes.base import Runtime, Timed
from ..specs import VAE_FACTOR, ComponentSpec
from ..weights.overrides import WeightOverrides
from . import images, masking, prompts, resize, samplers, schedules, sdxl
from .conditioning import Conditioning, RowConditioning, TextEncoder, TextOptions
from .control import Control, ControlModels, controlled_unet
from .denoisers import Denoise, ModelDenoiser, guidance_embedding, guided, masked
from .embeddings import Embedding, Vocabulary, read_folder
from .rng import make_generator
from .tiling import OVERLAP, TILE, tiled
from .tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

MAX_SEED = 4294967294          # A1111 draws random seeds below this
TOKEN_EMBEDDING = "embeddings.token_embedding.weight"      # CLIP's table; textual inversion extends it
TILING = "_tiling"                         # a component's seamless-tiling graph: unet -> unet_tiling
VAES = ("full", "tiny")                    # Request.vae: the export's VAE, or its tiny autoencoder (TAESD)


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
    vae_decoder_tiny: Runtime | None = None   # the tiny autoencoder (TAESD), exported with --tiny-vae
    vae_encoder_tiny: Runtime | None = None
    control: ControlModels | None = None      # the export's ControlNets, loaded on first use
    variants: Variants | None = None          # the ControlNet UNet and the seamless-tiling graphs
    text_encoder_2: Runtime | None = None     # SDXL's OpenCLIP ViT-bigG (``text_encoder`` is its CLIP ViT-L)
    tokenizer_2: ClipTokenizer | None = None


@dataclass(frozen=True)
class Variant:
    """A graph standing for a component: it runs that component's weights (its LoRAs and overrides)."""
    component: Any                              # manifest Component of the graph
    spec: ComponentSpec
    stands_for: str                             # "unet", "vae_decoder", ...


@dataclass
class Variants:
    """The export's variant graphs by name: ``unet_control`` (the UNet taking ControlNet residuals) and
    ``<component>_tiling`` (seamless tiling's circular-padded UNet and VAE). Each is loaded on first use with
    the weights its component runs (``reload``)."""
    graphs: dict[str, Variant]
    load: Callable[..., Runtime]                # (manifest Component, spec, initializers) -> Runtime
    initializers: dict[str, dict | None] = field(default_factory=dict)
    loaded: dict[str, Runtime] = field(default_factory=dict)

    def get(self, name: str) -> Runtime:
        if name not in self.loaded:
            v = self.graphs[name]
            self.loaded[name] = self.load(v.component, v.spec, self.initializers.get(name))
        return self.loaded[name]

    def reload(self, name: str, initializers: dict | None) -> Runtime | None:
        """Use these weights from now on (now if loaded, else on first use)."""
        self.initializers[name] = initializers
        return self.get(name) if self.loaded.pop(name, None) is not None else None


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
    """The parameters every task shares. Seeds: image i uses ``seed + i`` (A1111); -1/None draws one.

    ``prompt`` and ``negative_prompt`` may be lists of ``batch_size`` strings and ``seeds`` a list of
    ``batch_size`` seeds: each image of the batch then has its own (the rows of one UNet batch).
    """
    prompt: str | list[str]
    negative_prompt: str | list[str] = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "Euler a"
    scheduler: str | None = None
    seed: int | None = None
    seeds: list[int] | None = None        # one seed per image instead of seed + i
    batch_size: int = 1
    rng: str = "cpu"
    latents: np.ndarray | None = None
    strength: float = 1.0
    clip_skip: int = 1                    # A1111's "Clip skip": 2 uses the penultimate CLIP layer
    emphasis: str = "Original"            # how (word:1.2) weights apply: Original | No norm | Ignore | None
    comma_padding_backtrack: int = 20     # long prompts: tokens moved to the next chunk at a comma
    control: list[Control] = ()           # ControlNet units (sdrt.Control)
    tiled_vae: bool = False               # VAE in overlapping tiles: bounded memory for large images
    tiling: bool = False                  # seamless tiling: an image whose opposite edges join (A1111's Tiling)
    vae: str = "full"                     # "tiny": the tiny autoencoder (TAESD) decodes and encodes
    callback: Callable[[int, int], None] | None = None   # after each sampler step: (done, total); raise to stop
    preview: Callable[[np.ndarray], None] | None = None   # then: that step's denoised latents (B, C, h, w)
    # SDXL's size conditioning (diffusers' arguments, (height, width) pairs; None: the image's size) and the
    # refiner's aesthetic scores; the negative prompt's (negative_*) default to the positive's
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None

    @property
    def sdxl_conditioning(self) -> dict:
        """The SDXL size/aesthetic fields given other values than their defaults."""
        return {k: getattr(self, k) for k, default in sdxl.CONDITIONING_DEFAULTS.items()
                if _as_tuple(getattr(self, k)) != default}

    @property
    def text_options(self) -> TextOptions:
        return TextOptions(self.clip_skip, self.emphasis, self.comma_padding_backtrack)

    @property
    def prompts(self) -> list[str]:
        """The prompt of each image."""
        return [self.prompt] * self.batch_size if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def negative_prompts(self) -> list[str]:
        n = self.negative_prompt
        return [n] * self.batch_size if isinstance(n, str) else list(n)

    @property
    def image_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [self.seed + i for i in range(self.batch_size)]

    def check(self, vae_factor: int) -> None:
        for name, text in (("prompt", self.prompt), ("negative_prompt", self.negative_prompt)):
            if not isinstance(text, str) and not (isinstance(text, (list, tuple)) and len(text) == self.batch_size
                                                  and all(isinstance(t, str) for t in text)):
                raise InvalidRequest(f"{name} must be a string, or a list of batch_size ({self.batch_size}) strings")
        if self.seeds is not None and len(self.seeds) != self.batch_size:
            raise InvalidRequest(f"seeds must be a list of batch_size ({self.batch_size}) seeds, not {self.seeds!r}")
        if self.width % vae_factor or self.height % vae_factor or self.width < 8 or self.height < 8:
            raise InvalidRequest(f"width and height have to be positive multiples of {vae_factor} "
                                 f"but are {self.width} and {self.height}")
        if not 1 <= self.steps <= 1000:
            raise InvalidRequest(f"steps must be between 1 and 1000, not {self.steps}")
        if not 0.0 <= self.strength <= 1.0:
            raise InvalidRequest(f"strength (denoising strength) must be in [0, 1], not {self.strength}")
        if self.batch_size < 1:
            raise InvalidRequest(f"batch_size must be >= 1, not {self.batch_size}")
        if self.vae not in VAES:
            raise InvalidRequest(f"vae must be one of {', '.join(VAES)}, not {self.vae!r}")


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix: generate, upscale, then img2img at the larger size.

    The target is ``width x height`` when given (one of them: the other keeps the aspect ratio), else the
    first pass's size times ``scale``, rounded down to a multiple of 8. ``upscaler`` is an A1111 name
    (``resize.UPSCALERS``): "Latent" variants resize the latents, the others the decoded image.
    ``steps`` 0 and ``sampler``/``prompt``/``negative_prompt`` None reuse the first pass's.
    """
    scale: float = 2.0
    width: int = 0
    height: int = 0
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = 0.7
    sampler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def second_pass(self, req: Request, factor: int) -> Request:
        if self.upscaler not in resize.UPSCALERS:
            raise InvalidRequest(f"unknown hires upscaler {self.upscaler!r}; available: "
                                 f"{', '.join(resize.UPSCALERS)}")
        if self.scale <= 0 or self.width < 0 or self.height < 0:
            raise InvalidRequest("hires scale, width and height must be positive")
        width, height = self.width, self.height
        if not width and not height:
            width, height = int(req.width * self.scale), int(req.height * self.scale)
        elif not height:
            height = int(width * req.height / req.width)
        elif not width:
            width = int(height * req.width / req.height)
        return replace(req, width=width - width % factor, height=height - height % factor,
                       steps=self.steps or req.steps, strength=self.strength, sampler=self.sampler or req.sampler,
                       prompt=req.prompt if self.prompt is None else self.prompt,
                       negative_prompt=req.negative_prompt if self.negative_prompt is None else self.negative_prompt,
                       latents=None)

    def infotext(self, second: Request) -> dict:
        return {"Denoising strength": self.strength,
                "Hires upscale": self.scale if not (self.width or self.height) else None,
                "Hires resize": f"{second.width}x{second.height}" if self.width or self.height else None,
                "Hires steps": self.steps or None, "Hires upscaler": self.upscaler,
                "Hires sampler": self.sampler, "Hires prompt": self.prompt,
                "Hires negative prompt": self.negative_prompt}


@dataclass
class Start:
    """What a task hands the shared loop: start latents (VE) and how to condition and finish sampling."""
    x: np.ndarray
    concat: np.ndarray | None = None                       # 9-channel UNet: mask ⊕ masked-image latents
    wrap: Callable[[Denoise], Denoise] | None = None       # e.g. the 4-channel inpaint blend
    finish: Callable[[np.ndarray], np.ndarray] | None = None   # applied to the final VP latents


class StableDiffusion:
    """A loaded export. ``txt2img``/``img2img``/``inpaint`` return a :class:`Result`."""

    def __init__(self, models: Models, progress: bool = True, weights: WeightOverrides | None = None):
        self.models = models
        self.progress = progress
        self.weights = weights                  # LoRAs and weight overrides; None: the exported weights only
        self.loras: list[tuple[str, float]] = []        # set_loras'; a prompt's <lora:...> tags add to them
        self._prompt_loras = False                      # the weights now include a prompt's tags
        self.vocabulary: Vocabulary | None = None       # textual-inversion embeddings in use
        self.factor = models.arch.get("vae_factor", VAE_FACTOR)        # pixels per latent cell
        alphas = schedules.alphas_cumprod(models.scheduler_config)
        self.log_sigmas = np.log(np.sqrt((1.0 - alphas) / alphas))

    def txt2img(self, prompt: str, hires: Hires | None = None, **kwargs) -> Result:
        """Text to image; with ``hires``, A1111's two-pass hires fix. Keyword arguments are the fields of
        :class:`Request`."""
        req = self._request(prompt, kwargs)

        def start(gens, plan):
            x = self._noise(req, gens) * plan.init_sigma
            return Start(x, concat=self._unmasked(req, gens))
        if hires is None:
            return self._generate(req, "txt2img", start)
        return self._hires(req, hires, start)

    def _hires(self, req: Request, hires: Hires, start: Callable) -> Result:
        """First pass, upscale (latents, or the decoded images), then img2img at the target size."""
        began, spent = time.perf_counter(), _spent(self.models)
        second = hires.second_pass(req, self.factor)
        second.check(self.factor)
        latents, _ = self._sample(req, start)
        kind, how = resize.UPSCALERS[hires.upscaler]
        if kind == "latent":
            upscaled = resize.latents(latents, second.height // self.factor, second.width // self.factor, how)
        else:
            size = (second.width, second.height)
            pixels = np.concatenate([images.to_array(pic.resize(size, how), *size)
                                     for pic in self._decode(latents, req)])

        def second_start(gens, plan):        # fresh generators of the same seeds, as A1111's second pass
            x0 = upscaled if kind == "latent" else self._encode(pixels, gens, second)
            x = x0 + plan.sigmas[0] * self._noise(second, gens)
            return Start(x, concat=self._unmasked(second, gens))
        latents, plan = self._sample(second, second_start, first_pass_steps=req.steps)
        pics = self._decode(latents, second)
        return self._result(req, "txt2img", plan, pics, self._timings(spent, began), hires.infotext(second))

    def outpaint(self, image: Image.Image, prompt: str, left: int = 0, right: int = 0, top: int = 0,
                 bottom: int = 0, overlap: int = 8, **kwargs) -> Result:
        """Extend the canvas by the given pixels on each side and inpaint the new area.

        The new area starts as the image's edge pixels repeated outwards; the mask also covers ``overlap``
        pixels of the image along each extended side, so the seam is repainted. Works best with an
        inpainting (9-channel) model; keyword arguments are those of :meth:`inpaint`.
        """
        sides = {"left": left, "right": right, "top": top, "bottom": bottom}
        if any(v < 0 or v % self.factor for v in sides.values()) or not any(sides.values()):
            raise InvalidRequest(f"outpaint needs left/right/top/bottom as non-negative multiples of "
                                 f"{self.factor}, at least one positive; got {sides}")
        if overlap < 0 or any(overlap >= n for n in image.size):
            raise InvalidRequest(f"overlap must be between 0 and the image size, not {overlap}")
        canvas, mask = images.extend(image, left, right, top, bottom, overlap)
        return self.inpaint(canvas, mask, prompt, **kwargs)

    def img2img(self, image: Image.Image, prompt: str, strength: float = 0.75, resize_mode: int | str = 0,
                **kwargs) -> Result:
        """Image to image: ``strength`` of the schedule is run from the noised image latents.

        ``resize_mode`` fits the image to ``width`` x ``height`` as A1111 does (``images.RESIZE_MODES``): 0 just
        resize, 1 crop and resize, 2 resize and fill, 3 encode at the image's own size and resize the latents
        (bilinear, "Just resize (latent upscale)").
        """
        mode = images.resize_mode(resize_mode)
        req = self._request(prompt, {"width": image.width, "height": image.height, **kwargs, "strength": strength})
        if mode == 3 and (image.width % self.factor or image.height % self.factor):
            raise InvalidRequest(f"resize_mode 3 (latent upscale) encodes the image at its own size, which must be "
                                 f"a multiple of {self.factor}, not {image.width}x{image.height}")
        size = image.size if mode == 3 else (req.width, req.height)
        pixels = images.to_array(image if mode == 3 else images.resize_image(image.convert("RGB"), mode, *size), *size)

        def start(gens, plan):
            x0 = self._encode(pixels, gens, req)
            if mode == 3 and x0.shape[2:] != (req.height // self.factor, req.width // self.factor):
                x0 = resize.latents(x0, req.height // self.factor, req.width // self.factor)
            x = x0 + plan.sigmas[0] * self._noise(req, gens)
            return Start(x, concat=self._unmasked(req, gens))
        return self._generate(req, "img2img", start)

    def _unmasked(self, req: Request, gens) -> np.ndarray | None:
        """What an inpainting (9-channel) UNet gets besides the latents when nothing is masked: a mask of 1
        and the latents of an empty (0) image, as A1111 conditions txt2img and img2img on inpainting models
        (and as diffusers' inpainting pipeline does for an all-white mask). None for a 4-channel UNet."""
        if self.models.arch.get("unet_in_channels", 4) != 9:
            return None
        shape = (req.batch_size, 1, req.height // self.factor, req.width // self.factor)
        empty = self._encode(np.zeros((1, 3, req.height, req.width), np.float32), gens, req)
        return np.concatenate([np.ones(shape, np.float32), empty], axis=1)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, strength: float = 1.0,
                mask_blur: int | tuple[int, int] = 0, fill: int | str = "original", invert_mask: bool = False,
                only_masked: bool = False, padding: int = 32, resize_mode: int | str = 0, **kwargs) -> Result:
        """Repaint where ``mask`` is white: a 9-channel inpainting UNet, or mask blending on a 4-channel one.

        Args (A1111's inpainting options):
            mask_blur: Gaussian blur of the mask in pixels (one value, or x and y).
            fill: what the masked area starts from (``masking.INPAINTING_FILL``, or 0..3): "original" the image,
                "fill" the image with the masked area painted by blurs of its surroundings, "latent noise" random
                latents, "latent nothing" zero latents. The last two change the start latents, so they act
                when ``strength`` < 1 (at 1 the start is pure noise, as in diffusers).
            invert_mask: repaint where the mask is black ("Inpaint not masked").
            only_masked: A1111's "Only masked": inpaint the box around the mask (plus ``padding`` pixels, grown
                to the aspect ratio of ``width`` x ``height``) at ``width`` x ``height``, then paste the result
                back into the full image through the blurred mask. An empty mask falls back to img2img.
            resize_mode: how the image is fitted to ``width`` x ``height`` (see :meth:`img2img`; not 3 here).
        """
        if image.size != mask.size:
            raise InvalidRequest(f"mask is {mask.width}x{mask.height} but the image is "
                                 f"{image.width}x{image.height}; they must be the same size")
        fill, mode = masking.fill_mode(fill), images.resize_mode(resize_mode)
        if mode == 3:
            raise InvalidRequest("resize_mode 3 (latent upscale) is for img2img; inpaint with 0, 1 or 2")
        image, mask = image.convert("RGB"), masking.prepare(mask, mask_blur, invert_mask)
        req = self._request(prompt, {"width": image.width, "height": image.height, **kwargs, "strength": strength})
        box = masking.crop_region(mask, padding) if only_masked else None
        if only_masked and box is None:
            return self.img2img(image, prompt, strength, resize_mode=mode, **kwargs)
        if box is not None:
            box = masking.expand_crop_region(box, req.width, req.height, image.width, image.height)
            work, work_mask = (images.resize_image(im.crop(box), 2, req.width, req.height) for im in (image, mask))
            req = replace(req, control=[_cropped(unit, box, image.size) for unit in req.control])
        else:
            work, work_mask = (images.resize_image(im, mode, req.width, req.height) for im in (image, mask))
        if fill == "fill":
            work = masking.fill(work, work_mask)
        pixels = images.to_array(work, req.width, req.height)
        m = images.mask_array(work_mask, req.width, req.height)
        extra = {"Mask blur": mask_blur if np.isscalar(mask_blur) and mask_blur else None,
                 "Mask mode": "Inpaint not masked" if invert_mask else None,
                 "Masked content": fill if fill != "original" else None,
                 "Inpaint area": "Only masked" if box else None, "Masked area padding": padding if box else None}

        def start(gens, plan):
            return self._inpaint_start(req, pixels, m, gens, plan, fill)
        result = self._generate(req, "inpaint", start, extra)
        if box is not None:
            result.images = [masking.paste(pic, image, mask, box) for pic in result.images]
        return result

    def _inpaint_start(self, req, pixels, mask, gens, plan, fill: str = "original") -> Start:
        """diffusers' order of draws: image latents (4-ch or strength < 1), noise, masked-image latents.
        "latent noise" / "latent nothing" replace the masked image latents (A1111), the noise being the first
        draw of each image's seed, as A1111's ``create_random_tensors`` makes it."""
        nine = self.models.arch.get("unet_in_channels", 4) == 9
        full = req.strength == 1.0
        x0 = self._encode(pixels, gens, req) if (not nine or not full) else None
        noise = self._noise(req, gens)
        m = mask[:, :, ::self.factor, ::self.factor]   # nearest-neighbour downscale, as torch's interpolate
        if x0 is not None and fill in ("latent noise", "latent nothing"):
            fresh = [make_generator(req.rng, req.seed + i) for i in range(req.batch_size)]
            x0 = x0 * (1.0 - m) + (m * _draw(fresh, x0.shape) if fill == "latent noise" else 0.0)
        x = noise * plan.init_sigma if full else x0 + plan.sigmas[0] * noise
        masked_latents = self._encode(pixels * (mask < 0.5), gens, req)
        if nine:
            return Start(x, concat=np.concatenate([np.repeat(m, len(x), 0), masked_latents], axis=1))
        return Start(x, wrap=lambda d: masked(d, m, x0, noise, float(plan.sigmas[0])),
                     finish=lambda z: m * z + (1.0 - m) * x0)

    def set_loras(self, loras: list[tuple[str, float]]) -> None:
        """Generate with exactly these LoRAs from now on: ``[(name_or_path, weight), ...]``, [] for none.

        A name is ``<name>.safetensors`` in the ``lora_dir`` given to ``sdrt.load`` (A1111 style), a path is
        used as is. Only the components whose merged weights change are reloaded; the same set again is free.
        A prompt's ``<lora:name:weight>`` tags apply on top of these, for that generation only.
        """
        self._use(self._weights().set_loras(loras))
        self.loras, self._prompt_loras = list(loras), False

    def override_weights(self, component: str, values: dict[str, np.ndarray]) -> None:
        """Run ``component`` with these weights instead of the exported ones, by torch parameter name, e.g.
        ``{"embeddings.token_embedding.weight": table}`` for "text_encoder" (the first axis may grow: new
        tokens). Replaces the component's previous overrides ({} restores the export's); LoRAs add on top."""
        self._use(self._weights().set_values(component, values))

    def load_embeddings(self, folder: str | Path) -> tuple[list[Embedding], list[Path]]:
        """Use every textual-inversion embedding in ``folder`` (A1111's ``embeddings``; a file's name is the
        word that calls it in prompts). Their vectors extend the text encoder's token-embedding table, which
        is reloaded once. SDXL: both text encoders' tables, each with its part of the file (``clip_l``,
        ``clip_g``). Returns the embeddings loaded and the files skipped (another width, unreadable)."""
        weights = self._weights()
        tables = {c: weights.original(c, TOKEN_EMBEDDING) for c in ("text_encoder", "text_encoder_2")
                  if getattr(self.models, c) is not None}
        if len({len(t) for t in tables.values()}) != 1:
            raise InvalidRequest(f"the text encoders' vocabularies differ in size ({[len(t) for t in tables.values()]});"
                                 " textual-inversion embeddings need one vocabulary")
        width = tables["text_encoder"].shape[1] if "text_encoder" in tables else None
        width_g = tables["text_encoder_2"].shape[1] if "text_encoder_2" in tables else None
        loaded, skipped = read_folder(Path(folder), width, width_g)
        vocabulary = Vocabulary(loaded, self.models.tokenizer.tokens, len(next(iter(tables.values()))))
        for component, table in tables.items():
            second = component == "text_encoder_2"
            self._use(weights.set_values(component, {TOKEN_EMBEDDING: vocabulary.table(table, second)}
                                         if loaded else {}))
        self.vocabulary = vocabulary if loaded else None
        return loaded, skipped

    def _weights(self) -> WeightOverrides:
        if self.weights is None:
            raise InvalidRequest("this pipeline was assembled without weight overrides; load it with sdrt.load")
        return self.weights

    def _use(self, runtimes: dict[str, Runtime | None]) -> None:
        for name, runtime in runtimes.items():
            if hasattr(self.models, name):       # not a variant graph: Variants holds those
                setattr(self.models, name, runtime)

    # -- shared steps -------------------------------------------------------------------------------

    def _request(self, prompt: str | list[str], kwargs: dict) -> Request:
        if isinstance(prompt, (list, tuple)) and "batch_size" not in kwargs:      # a prompt per image
            kwargs = {**kwargs, "batch_size": len(prompt)}
        try:
            req = Request(prompt, **kwargs)
        except TypeError as e:
            raise InvalidRequest(str(e)) from None
        req.check(self.factor)
        arch = self.models.arch
        req.text_options.check(min(arch.get("text_layers", 12), arch.get("text_layers_2", arch.get("text_layers", 12))))
        if req.seed is None or req.seed == -1:
            req = replace(req, seed=random.randrange(MAX_SEED))
        return req

    def _generate(self, req: Request, task: str, prepare: Callable, extra: dict | None = None) -> Result:
        """Sample, decode, and describe the result (``extra``: more infotext parameters)."""
        began, spent = time.perf_counter(), _spent(self.models)
        latents, plan = self._sample(req, prepare)
        pics = self._decode(latents, req)
        return self._result(req, task, plan, pics, self._timings(spent, began), extra)

    def _timings(self, spent: weakref.WeakKeyDictionary, began: float) -> dict[str, float]:
        """Seconds per component since ``spent`` was taken, counting runtimes loaded or replaced meanwhile
        (LoRA switches, ControlNets, tiling graphs) from zero."""
        timings: dict[str, float] = {}
        for name, runtime in _runtimes(self.models):
            timings[name] = timings.get(name, 0.0) + runtime.seconds - spent.get(runtime, 0.0)
        timings["total"] = time.perf_counter() - began
        return timings

    def _sample(self, req: Request, prepare: Callable,
                first_pass_steps: int | None = None) -> tuple[np.ndarray, samplers.SamplingPlan]:
        """Plan the schedule, encode the prompts, prepare the start, run the sampler: final VP latents."""
        plan = samplers.plan(req.sampler, req.steps, self.models.scheduler_config, strength=req.strength,
                             scheduler=req.scheduler)
        gens = [make_generator(req.rng, seed) for seed in req.image_seeds]
        cond = self._conditioning(req, first_pass_steps)    # may switch LoRAs, i.e. the UNet runtime
        m = self._models(req)
        # the ControlNet wrapper asks the denoiser which model evaluation it is running (start/end)
        unet = controlled_unet(m, req, plan, lambda: model.step - 1) if req.control else m.unet
        start = prepare(gens, plan)
        model = ModelDenoiser(unet, self.log_sigmas, cond.blocks, m.arch.get("prediction_type", "epsilon"),
                              start.concat, cond.added if cond.pooled is not None else None,
                              self._timestep_cond(req))
        d = model if cond.plain else guided(model, req.guidance_scale, cond.weights)
        d = start.wrap(d) if start.wrap else d
        total = len(plan.sigmas) - 1

        def step(i, x, denoised):
            bar.update(1)
            if req.callback is not None:
                req.callback(i + 1, total)
            if req.preview is not None:
                req.preview(denoised)
        with _progress(total, self.progress) as bar:
            x = plan.run(d, start.x.astype(np.float32), noise=lambda: _draw(gens, start.x.shape), callback=step)
        latents = (x / np.sqrt(1.0 + float(plan.sigmas[-1]) ** 2)).astype(np.float32)
        return (start.finish(latents) if start.finish else latents), plan

    def _conditioning(self, req: Request, first_pass_steps: int | None = None) -> Conditioning:
        """The prompts' text conditioning over the steps (A1111 syntax: emphasis, BREAK, long prompts,
        prompt editing, AND, CLIP skip); ``<lora:...>`` tags are removed here (see ``_extra_networks``)."""
        texts, networks = zip(*(prompts.extra_networks(p) for p in req.prompts))
        if any(n != networks[0] for n in networks):
            raise InvalidRequest("the prompts of one batch name different <lora:...> tags; a batch runs one set "
                                 "of weights, so give every prompt the same tags")
        self._extra_networks(networks[0])
        # an LCM-distilled UNet gets no classifier-free guidance (its guidance goes in through timestep_cond)
        guidance = req.guidance_scale > 1.0 and not self.models.arch.get("time_cond_proj_dim")
        if self.models.arch.get("family") == "sdxl":
            encode = self._sdxl_encoder(req)
            extra = (sdxl.time_ids(self.models.arch, req.height, req.width, **req.sdxl_conditioning),)
        elif req.sdxl_conditioning:
            raise InvalidRequest(f"{', '.join(req.sdxl_conditioning)}: SDXL's size and aesthetic conditioning; this "
                                 f"model ({self.models.arch.get('family', 'Stable Diffusion 1.x/2.x')}) has none, "
                                 "remove them")
        else:
            encode = TextEncoder(self.models.tokenizer, self.models.text_encoder, req.text_options, self.vocabulary)
            extra = ()
        if isinstance(req.prompt, str) and isinstance(req.negative_prompt, str):
            return Conditioning.build(encode, texts[0], req.negative_prompt, req.steps, guidance,
                                      req.batch_size, first_pass_steps, *extra)
        return RowConditioning([Conditioning.build(encode, text, negative, req.steps, guidance, 1, first_pass_steps,
                                                   *extra)
                                for text, negative in zip(texts, req.negative_prompts)], req.steps)

    def _sdxl_encoder(self, req: Request) -> sdxl.SDXLTextEncoder:
        m = self.models
        pairs = [(m.tokenizer, m.text_encoder), (m.tokenizer_2, m.text_encoder_2)]
        parts = [sdxl.HiddenStateEncoder(tok, runtime, req.text_options, self.vocabulary) for tok, runtime in pairs
                 if runtime is not None]
        return sdxl.SDXLTextEncoder(parts, bool(m.arch.get("force_zeros_for_empty_prompt")))

    def _timestep_cond(self, req: Request) -> np.ndarray | None:
        """An LCM-distilled UNet's guidance input: the embedding of guidance_scale - 1 (diffusers' convention;
        such a UNet gets no classifier-free guidance and no negative prompt). None for other UNets."""
        dim = self.models.arch.get("time_cond_proj_dim")
        return None if not dim else guidance_embedding(req.guidance_scale - 1.0, dim, req.batch_size)

    def _extra_networks(self, networks: list[prompts.ExtraNetwork]) -> None:
        unknown = sorted({n.kind for n in networks} - {"lora"})
        if unknown:
            raise InvalidRequest(f"the prompt names extra networks sdrt does not support: {unknown}; "
                                 "only <lora:name:weight> is")
        tags = [_lora_tag(n) for n in networks if n.kind == "lora"]
        if tags or self._prompt_loras:
            self._use(self._weights().set_loras(self.loras + tags))
            self._prompt_loras = bool(tags)

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

    def _models(self, req: Request) -> Models:
        """The components ``req`` runs: with ``tiling``, the circular-padded UNet and VAE."""
        if not req.tiling:
            return self.models
        variants = self.models.variants
        graphs = variants.graphs if variants is not None else {}
        tiling = {v.stands_for: name for name, v in graphs.items() if name.endswith(TILING)}
        if not tiling:
            raise InvalidRequest("this export has no seamless-tiling graphs; re-export the model with "
                                 "`sdrt export MODEL OUT --tiling`")
        if req.control:
            raise InvalidRequest("seamless tiling together with ControlNet is not supported yet")
        if req.vae == "tiny":
            raise InvalidRequest("seamless tiling decodes with the full VAE's circular-padded graph; use vae='full'")
        return replace(self.models, **{component: variants.get(name) for component, name in tiling.items()})

    def _encode(self, pixels: np.ndarray, gens, req: Request) -> np.ndarray:
        """VAE-encode and sample the latent distribution with each image's generator (diffusers' order); the tiny
        autoencoder's latents are deterministic and draw nothing."""
        tiny = req.vae == "tiny"
        if tiny:
            encoder, output = self._tiny("vae_encoder_tiny"), "latent_sample"
        else:
            encoder, output = self._models(req).vae_encoder, "latent_parameters"
        if encoder is None:
            raise InvalidRequest("this export has no VAE encoder, which img2img and inpainting need; "
                                 "re-export the model with `sdrt export`")

        def run(x):
            return encoder.run({"sample": x})[output].astype(np.float32)
        params = tiled(run, pixels, 1 / self.factor, self.factor * TILE, self.factor * OVERLAP) if req.tiled_vae \
            else run(pixels)
        if tiny:
            return np.concatenate([params] * len(gens)) * np.float32(self._scaling(req))
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        samples = [mean + std * g.randn(mean.shape) for g in gens]
        return np.concatenate(samples) * np.float32(self.models.arch["vae_scaling_factor"])

    def _decode(self, latents: np.ndarray, req: Request) -> list[Image.Image]:
        """VAE-decode image by image (whole, or in overlapping tiles), with the full or the tiny autoencoder."""
        decoder = self._tiny("vae_decoder_tiny") if req.vae == "tiny" else self._models(req).vae_decoder
        z = latents / np.float32(self._scaling(req))

        def run(x):
            return decoder.run({"latent_sample": x})["sample"]
        return [pic for i in range(len(z))
                for pic in images.to_pil(tiled(run, z[i:i + 1], self.factor) if req.tiled_vae else run(z[i:i + 1]))]

    def _scaling(self, req: Request) -> float:
        """The factor from the chosen autoencoder's latents to the UNet's (TAESD's are the UNet's: 1.0)."""
        key = "tiny_vae_scaling_factor" if req.vae == "tiny" else "vae_scaling_factor"
        return self.models.arch[key]

    def _tiny(self, name: str) -> Runtime:
        runtime = getattr(self.models, name)
        if runtime is None:
            taesd = "madebyollin/taesdxl" if self.models.arch.get("family") == "sdxl" else "madebyollin/taesd"
            raise InvalidRequest("this export has no tiny autoencoder (TAESD); re-export the model with "
                                 f"`sdrt export MODEL OUT --tiny-vae {taesd}`, or use vae='full'")
        return runtime

    @property
    def has_tiny_vae(self) -> bool:
        return self.models.vae_decoder_tiny is not None

    def preview(self, latents: np.ndarray) -> list[Image.Image]:
        """Cheap previews of (B, C, h, w) latents in the UNet's space (e.g. a step's denoised estimate) through
        the tiny autoencoder's decoder: A1111's "TAESD" live preview. InvalidRequest without one."""
        decoder = self._tiny("vae_decoder_tiny")
        z = np.asarray(latents, dtype=np.float32) / np.float32(self.models.arch["tiny_vae_scaling_factor"])
        return [pic for i in range(len(z))
                for pic in images.to_pil(decoder.run({"latent_sample": z[i:i + 1]})["sample"])]

    def _result(self, req: Request, task: str, plan, pics, timings, extra: dict | None = None) -> Result:
        seeds = req.image_seeds[:len(pics)]
        params = {"Steps": req.steps, "Sampler": plan.label,
                  "Schedule type": "SGM Uniform" if samplers.schedule_kind(req.scheduler) == "sgm_uniform" else None,
                  "CFG scale": req.guidance_scale, "Seed": None,
                  "Size": f"{req.width}x{req.height}", "Model": self.models.name,
                  "Denoising strength": req.strength if task != "txt2img" else None,
                  "RNG": {"cpu": None, "nv": "NV", "numpy": "NumPy"}.get(req.rng),
                  "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
                  "Emphasis": req.emphasis if req.emphasis != "Original" else None}
        params["Lora hashes"] = self.weights.hashes() if self.weights else None
        params |= {"Tiling": True if req.tiling else None, "Tiled VAE": True if req.tiled_vae else None,
                   "VAE Encoder": "TAESD" if req.vae == "tiny" and task != "txt2img" else None,   # A1111's
                   "VAE Decoder": "TAESD" if req.vae == "tiny" else None,
                   **{f"ControlNet {i}": unit.infotext() for i, unit in enumerate(req.control or ())},
                   **(extra or {})}
        texts = [images.infotext(p, n, {**params, "Seed": s})
                 for p, n, s in zip(req.prompts, req.negative_prompts, seeds)]
        parameters = {"task": task, **{k: v for k, v in req.__dict__.items()
                                       if k not in ("latents", "callback", "preview")}}
        return Result(pics, seeds, texts, parameters, timings)


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _lora_tag(tag: prompts.ExtraNetwork) -> tuple[str, float]:
    """``<lora:name>`` / ``<lora:name:weight>`` -> (name, weight); A1111's separate UNet weight is refused."""
    name, *weights = tag.args
    if len(weights) > 1:
        raise InvalidRequest(f"<lora:{':'.join(tag.args)}>: separate text-encoder and UNet weights are not "
                             "supported; give one weight, <lora:name:0.8>")
    try:
        return name, float(weights[0]) if weights else 1.0
    except ValueError:
        raise InvalidRequest(f"<lora:{':'.join(tag.args)}>: the weight must be a number") from None


def _cropped(unit: Control, box: tuple[int, int, int, int], size: tuple[int, int]) -> Control:
    """A ControlNet unit for the "Only masked" region: a control image the size of the inpainted picture is
    cropped to the region (as sd-webui-controlnet does), others are kept."""
    x1, y1, x2, y2 = box
    if unit.image.shape[1::-1] != size:
        return unit
    return replace(unit, image=unit.image[y1:y2, x1:x2])


def _draw(gens, shape) -> np.ndarray:
    """One standard-normal draw per image, each from that image's generator (diffusers' generator list)."""
    return np.concatenate([g.randn((1, *shape[1:])) for g in gens])


def _runtimes(models: Models) -> list[tuple[str, Timed]]:
    """Every timed runtime of ``models`` with the component it counts for: the ControlNets as "controlnet",
    a variant graph as the component it stands for."""
    found = [(k, getattr(models, k)) for k in ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder",
                                               "vae_encoder_tiny", "vae_decoder_tiny")]
    if models.control is not None:
        found += [("controlnet", r) for r in models.control.loaded.values()]
    if models.variants is not None:
        found += [(models.variants.graphs[k].stands_for, r) for k, r in models.variants.loaded.items()]
    return [(k, r) for k, r in found if isinstance(r, Timed)]


def _spent(models: Models) -> weakref.WeakKeyDictionary:
    """Seconds spent so far in each runtime (weakly held: a runtime replaced meanwhile can be freed)."""
    return weakref.WeakKeyDictionary({r: r.seconds for _, r in _runtimes(models)})


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="sampling", unit="step", disable=None if enabled else True, leave=False)
