"""ControlNet in the NumPy pipeline: A1111-style units and a wrapper around the UNet ``Runtime`` that adds
their residuals, so txt2img, img2img and inpainting (4- and 9-channel) all take ``control=[...]`` unchanged.

    pipe.txt2img("a house", control=[Control(image=photo, model="canny", preprocessor="canny", scale=0.8)])

Each unit follows sd-webui-controlnet: a preprocessor (``none``, ``canny``), a resize mode fitting the control
map to the generation size, a weight, guidance start/end, and a control mode. "My prompt is more important"
scales the residuals by soft weights rising to 1 towards the mid block; "ControlNet is more important" does
the same and adds them to the conditional batch only (A1111's ``cfg_injection``), which is diffusers'
``guess_mode``. The soft weights are diffusers' ``logspace(-1, 0, n)``; for SD's 13 residuals they are A1111's
``0.825 ** (12 - i)`` to within 0.6 %.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from .. import specs
from ..errors import InvalidRequest
from ..runtimes.base import Runtime

PREPROCESSORS = ("none", "canny")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")


@dataclass(frozen=True)
class Control:
    """One ControlNet unit (a unit of A1111's sd-webui-controlnet).

    Args:
        image: the control image (PIL image, or an H x W [x 1/3/4] uint8 array), or the preprocessor's input.
        model: the name of a ControlNet in the export (``sdrt export ... --controlnet NAME=MODEL``).
        scale: conditioning scale (A1111's weight), >= 0.
        start, end: the fraction of the model evaluations during which the unit acts (A1111's guidance
            start/end, diffusers' control_guidance_start/end): evaluation i of n when i/n >= start and
            (i + 1)/n <= end.
        preprocessor: ``none`` (image is the control map) or ``canny``; any other name (e.g. ``depth_midas``)
            with ``processed=True``, the image then being that preprocessor's output.
        processed: the image is already the preprocessor's output: no preprocessing.
        resize_mode: "Just Resize", "Crop and Resize" (A1111's default) or "Resize and Fill" (or 0, 1, 2).
        control_mode: "Balanced", "My prompt is more important" or "ControlNet is more important" (or 0, 1, 2).
        low_threshold, high_threshold: canny's hysteresis thresholds (A1111's defaults 100 and 200).
    """
    image: Any
    model: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"
    processed: bool = False
    resize_mode: str | int = "Crop and Resize"
    control_mode: str | int = "Balanced"
    low_threshold: int = 100
    high_threshold: int = 200

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise InvalidRequest(f"Control.model must name a ControlNet of the export, not {self.model!r}")
        if not _number(self.scale) or self.scale < 0:
            raise InvalidRequest(f"ControlNet {self.model!r}: scale must be a number >= 0, not {self.scale!r}")
        if not (_number(self.start) and _number(self.end) and 0.0 <= self.start < self.end <= 1.0):
            raise InvalidRequest(f"ControlNet {self.model!r}: start and end must satisfy 0 <= start < end <= 1, "
                                 f"not start={self.start!r}, end={self.end!r}")
        if not (0 <= self.low_threshold <= self.high_threshold):
            raise InvalidRequest(f"ControlNet {self.model!r}: canny thresholds must satisfy 0 <= low <= high, "
                                 f"not {self.low_threshold!r}, {self.high_threshold!r}")
        preprocessor = str(self.preprocessor).strip().lower()
        if preprocessor not in PREPROCESSORS and not self.processed:
            raise InvalidRequest(f"ControlNet {self.model!r}: preprocessor {self.preprocessor!r} is not available; "
                                 f"sdrt runs {', '.join(PREPROCESSORS)}. Run it yourself and pass its output "
                                 "with processed=True, or pass the control map with preprocessor='none'")
        object.__setattr__(self, "preprocessor", preprocessor)
        object.__setattr__(self, "resize_mode", _choice(self.resize_mode, RESIZE_MODES, "resize_mode"))
        object.__setattr__(self, "control_mode", _choice(self.control_mode, CONTROL_MODES, "control_mode"))
        object.__setattr__(self, "image", _rgb(self.image, self.model))

    def infotext(self) -> str:
        """The unit as sd-webui-controlnet writes it into A1111's generation parameters ("ControlNet 0")."""
        fields = {"Module": self.preprocessor, "Model": self.model, "Weight": self.scale,
                  "Resize Mode": self.resize_mode}
        if self.preprocessor == "canny" and not self.processed:
            fields |= {"Threshold A": float(self.low_threshold), "Threshold B": float(self.high_threshold)}
        fields |= {"Guidance Start": self.start, "Guidance End": self.end, "Control Mode": self.control_mode}
        return ", ".join(f"{k}: {v}" for k, v in fields.items())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(value: str | int, names: tuple[str, ...], what: str) -> str:
    """A1111 accepts a mode by name (any case) or by its index."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    by_lower = {n.lower(): n for n in names}
    if isinstance(value, str) and value.strip().lower() in by_lower:
        return by_lower[value.strip().lower()]
    raise InvalidRequest(f"unknown ControlNet {what} {value!r}; use one of: {', '.join(names)} "
                         f"(or 0..{len(names) - 1})")


def _rgb(image, model: str) -> np.ndarray:
    """H x W x 3 uint8; alpha is composited over white as A1111's ``HWC3`` does."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3) and image.size:
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise InvalidRequest(f"ControlNet {model!r}: the control image must be a PIL image or an H x W [x 1/3/4] "
                             f"uint8 array, not {type(image).__name__}")
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


# -- control maps ------------------------------------------------------------------------------------------

def control_map(unit: Control, width: int, height: int) -> np.ndarray:
    """The unit's control map at the generation size: (1, 3, H, W) float32 RGB in [0, 1]."""
    rgb = unit.image
    if unit.preprocessor == "canny" and not unit.processed:
        rgb = np.repeat(canny(rgb, unit.low_threshold, unit.high_threshold)[..., None], 3, axis=2)
    rgb = resize(rgb, width, height, unit.resize_mode)
    return (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


def canny(rgb: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges (0/255, H x W) of an RGB image, as A1111's ``canny`` preprocessor runs ``cv2.Canny``."""
    return _cv2("the canny preprocessor").Canny(rgb, low, high)


def _cv2(needed_by: str):
    try:
        import cv2
    except ImportError:
        raise InvalidRequest(f"{needed_by} needs OpenCV: `pip install sdrt[controlnet]` "
                             "(opencv-python-headless)") from None
    return cv2


def resize(rgb: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """Fit an H x W x 3 control map to width x height with A1111's resize modes (sd-webui-controlnet's
    ``detectmap_proc``): stretch, scale to cover and centre-crop, or scale to fit and pad with the median
    border colour."""
    if mode == "Just Resize":
        return _resample(rgb, width, height)
    h, w = rgb.shape[:2]
    k = (max if mode == "Crop and Resize" else min)(height / h, width / w)
    scaled = _resample(rgb, int(round(w * k)), int(round(h * k)))
    sh, sw = scaled.shape[:2]
    if mode == "Crop and Resize":
        top, left = max(0, (sh - height) // 2), max(0, (sw - width) // 2)
        return scaled[top:top + height, left:left + width]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    out = np.tile(np.median(border, axis=0).astype(np.uint8), (height, width, 1))
    top, left = max(0, (height - sh) // 2), max(0, (width - sw) // 2)
    out[top:top + sh, left:left + sw] = scaled
    return out


def _resample(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """A1111's ``high_quality_resize`` interpolation: nearest for maps of 3..199 colours (segmentation),
    area when shrinking, cubic when growing; two-colour (edge) maps are re-binarized with Otsu's threshold.
    Not reproduced: its extra NMS and thinning of one-pixel-wide edges."""
    if rgb.shape[:2] == (height, width):
        return rgb
    cv2 = _cv2("resizing a control image to the generation size")
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    binary = colours == 2 and rgb.min() < 16 and rgb.max() > 240
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif width * height < rgb.shape[0] * rgb.shape[1]:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    out = cv2.resize(rgb, (width, height), interpolation=interpolation)
    if binary:
        grey = out.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
        out = np.repeat(cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1][..., None], 3, axis=2)
    return out


# -- runtimes ----------------------------------------------------------------------------------------------

@dataclass
class ControlModels:
    """The export's ControlNets and the UNet taking their residuals, each loaded on its first use, so plain
    generation never loads them. ``load(component, spec)`` is the loader's (backend, threads, precision);
    the residual UNet is the pipeline's variant graph ``unet_control`` (it runs the UNet's LoRAs)."""
    controlnets: dict[str, Any]                 # name -> manifest Component
    arch: dict                                  # the export's architecture (its control_residuals)
    load: Callable[..., Runtime]
    variants: Any                               # the pipeline's Variants, holding "unet_control"
    loaded: dict[str, Runtime] = field(default_factory=dict)       # ControlNet name -> runtime

    def controlnet(self, name: str) -> Runtime:
        if name not in self.controlnets:
            raise InvalidRequest(f"ControlNet {name!r} is not in this export; it has: {', '.join(self.controlnets)}")
        if name not in self.loaded:
            component = self.controlnets[name]
            self.loaded[name] = self.load(component, specs.spec_for(component, self.arch))
        return self.loaded[name]

    @property
    def residuals(self) -> int:
        """How many residuals a ControlNet adds (SD 1.x/2.x: 12 down blocks and the mid block)."""
        return len(self.arch["control_residuals"])

    def unet(self) -> Runtime:
        return self.variants.get("unet_control")


@dataclass(frozen=True)
class Unit:
    """A unit ready to run: its ControlNet, control map, and residual weights."""
    net: Runtime
    cond: np.ndarray                 # (1, 3, H, W) control map
    scale: float
    start: float
    end: float
    weights: np.ndarray              # per residual: 1, or the soft weights
    cond_only: bool                  # residuals for the conditional batch only

    def active(self, i: int, n: int) -> bool:
        """diffusers' ``controlnet_keep``: evaluation i of n lies within [start, end]."""
        return not (i / n < self.start or (i + 1) / n > self.end)


def controlled_unet(models, req, plan, evaluation: Callable[[], int]) -> Runtime:
    """``models.unet`` with the residuals of ``req.control``'s units added (the units are checked here).

    Args:
        models: the pipeline's ``Models`` (its ``control`` holds the export's ControlNets).
        req: the ``Request``: control units, size, batch size, guidance scale.
        plan: the ``SamplingPlan``; its model calls are the evaluations that start/end count.
        evaluation: the index of the model evaluation being run (``ModelDenoiser.step - 1``).
    """
    units = list(req.control) if isinstance(req.control, (list, tuple)) else [req.control]
    if not all(isinstance(u, Control) for u in units):
        raise InvalidRequest("control must be a list of sdrt.Control units")
    if models.control is None:
        raise InvalidRequest("this export has no ControlNet; export one with "
                             "`sdrt export MODEL OUT --controlnet NAME=CONTROLNET`")
    n = models.control.residuals
    soft = np.logspace(-1, 0, n).astype(np.float32)
    ready = [Unit(models.control.controlnet(u.model), control_map(u, req.width, req.height), float(u.scale),
                  u.start, u.end, np.ones(n, np.float32) if u.control_mode == "Balanced" else soft,
                  u.control_mode == "ControlNet is more important") for u in units]
    return ControlledUnet(models.control.unet(), models.unet, ready, max(len(plan.calls), 1), req.batch_size,
                          req.guidance_scale > 1.0, models.arch["latent_channels"], evaluation)


class ControlledUnet:
    """The UNet Runtime ``ModelDenoiser`` runs when a request has ControlNet units.

    Every run feeds each active unit's ControlNet the run's latents (the first C channels, so 9-channel
    inpainting works), timestep and text embeddings (SDXL's pooled ones and time ids too), sums the residuals
    and runs the residual-taking UNet; with no unit active it runs the plain UNet. Start/end compare
    ``evaluation()``, the index of the model evaluation being run (diffusers' loop index over its timesteps,
    ``plan.calls``), with ``calls``. ``ModelDenoiser`` splits an evaluation into several runs when prompts
    differ in length; with guidance, the first ``batch`` rows of an evaluation's first run are the negative
    prompt's.
    """

    def __init__(self, unet: Runtime, plain: Runtime, units: list[Unit], calls: int, batch: int, guidance: bool,
                 latent_channels: int, evaluation: Callable[[], int]):
        self.unet, self.plain, self.units, self.calls = unet, plain, units, calls
        self.batch, self.guidance, self.channels = batch, guidance, latent_channels
        self.spec, self.evaluation = plain.spec, evaluation
        self._previous = None                   # the evaluation of the previous run

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        i = self.evaluation()
        first, self._previous = i != self._previous, i
        i = min(i, self.calls - 1)
        uncond = self.batch if first and self.guidance else 0
        residuals = [self._residuals(u, feeds, uncond if u.cond_only else 0)
                     for u in self.units if u.active(i, self.calls)]
        residuals = [r for r in residuals if r is not None]
        if not residuals:
            return self.plain.run(feeds)
        names = [t.name for t in self.unet.spec.inputs[len(self.spec.inputs):]]
        return self.unet.run({**feeds, **{k: sum(r[j] for r in residuals) for j, k in enumerate(names)}})

    def _residuals(self, unit: Unit, feeds, skip: int) -> list[np.ndarray] | None:
        """The unit's weighted residuals for every row of the run; zeros on the first ``skip`` rows."""
        rows = len(feeds["sample"])
        if skip >= rows:
            return None
        # the UNet's inputs the ControlNet shares: timestep, text embeddings (and SDXL's text_embeds, time_ids)
        given = {**feeds, "sample": feeds["sample"][:, :self.channels],
                 "controlnet_cond": np.repeat(unit.cond, rows, axis=0)}
        inputs = {t.name: given[t.name][skip:] for t in unit.net.spec.inputs if t.name != "conditioning_scale"}
        out = unit.net.run({**inputs, "conditioning_scale": np.array([unit.scale], np.float32)})
        res = [out[t.name].astype(np.float32) * w for t, w in zip(unit.net.spec.outputs, unit.weights)]
        return [np.concatenate([np.zeros((skip, *r.shape[1:]), np.float32), r]) if skip else r for r in res]
