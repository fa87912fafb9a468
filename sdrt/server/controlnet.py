"""sd-webui-controlnet over HTTP: ``alwayson_scripts.controlnet.args`` units become :class:`sdrt.Control`
units, plus the extension's ``/controlnet/*`` routes.

A unit is read as sd-webui-controlnet reads it (``internal_controlnet/args.py``): its legacy aliases
(``guidance``, ``lowvram``, ``input_image``, ``mask_image``), ``enabled`` false by default, out-of-range
``processor_res``/``threshold_a``/``threshold_b`` replaced by the preprocessor's defaults, resize and control
modes by name or index. The ``canny`` preprocessor runs as the extension runs it: the image scaled so its
short side is ``processor_res`` (``pixel_perfect`` derives it from the generation size), padded to a
multiple of 64, ``cv2.Canny``, unpadded; the pipeline then fits that map to the generation size.

A unit's ``model`` names one of the checkpoint's exported ControlNets (``sdrt export --controlnet NAME=...``),
listed by ``/controlnet/model_list`` as ``NAME [first 8 digits of its sha256]``. A name is resolved, first
match wins: (1) the listed title or NAME itself (any case); (2) the hash in brackets; (3) NAME containing
the requested name without its hash (shortest NAME wins, the extension's closest match); (4) exactly one
NAME that is a whole ``_``/``-``/space-separated word of the requested name, so a request written for A1111
("control_v11p_sd15_canny [d14c016b]") finds the export's "canny". Anything else is a 422 listing the names.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InvalidRequest
from ..pipelines import control as ctl
from .checkpoints import Checkpoint
from .codec import decode_image

TITLE = "ControlNet"                          # the always-on script, matched case-insensitively
VERSION = 2                                   # sd-webui-controlnet's external_code.get_api_version()
MODULES = ("none", "canny")                   # preprocessors sdrt runs
RESOLUTION = (512, 64, 2048)                  # processor_res: default, min, max (the extension's slider)
CANNY = ((100, 1, 255), (200, 1, 255))        # threshold_a, threshold_b: default, min, max
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Scale to Fit (Inner Fit)": "Crop and Resize",
                  "Outer Fit (Shrink to Fit)": "Resize and Fill", "Envelope (Outer Fit)": "Resize and Fill"}
LEGACY = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image", "mask_image": "mask"}


def titles(checkpoint: Checkpoint) -> list[str]:
    """/controlnet/model_list: the checkpoint's ControlNets as the extension lists models, "name [hash]"."""
    return [f"{name} [{sha[:8]}]" for name, sha in checkpoint.controlnets]


def resolve(requested: Any, checkpoint: Checkpoint, where: str) -> str:
    """The exported ControlNet a unit's ``model`` means (the rule in the module docstring)."""
    names = [name for name, _ in checkpoint.controlnets]
    if not isinstance(requested, str) or requested.strip() in ("", "None"):
        raise InvalidRequest(f"{where}.model: no ControlNet model selected; {_offer(checkpoint)}")
    text = requested.strip()
    bare, hashed = re.fullmatch(r"(.*?)\s*(?:\[([0-9a-fA-F]+)\])?", text).groups()
    lower = {name.lower(): name for name in names}
    if text.lower() in {t.lower() for t in titles(checkpoint)} or bare.lower() in lower:
        return lower[bare.lower()]
    by_hash = [name for name, sha in checkpoint.controlnets if hashed and sha.startswith(hashed.lower())]
    containing = sorted((name for name in names if bare and bare.lower() in name.lower()), key=len)
    words = set(re.split(r"[\s_\-]+", bare.lower()))
    in_words = [name for name in names if name.lower() in words]
    for found in (by_hash[:1], containing[:1], in_words if len(in_words) == 1 else []):
        if found:
            return found[0]
    raise InvalidRequest(f"{where}.model: model({requested}) not found in supported models; {_offer(checkpoint)}")


def _offer(checkpoint: Checkpoint) -> str:
    if not checkpoint.controlnets:
        return (f"checkpoint {checkpoint.title} has no ControlNet; export one with "
                "`sdrt export MODEL OUT --controlnet NAME=CONTROLNET`")
    return f"checkpoint {checkpoint.title} has: {', '.join(titles(checkpoint))}"


def units(alwayson: dict, checkpoint: Checkpoint, width: int, height: int,
          init_image: Image.Image | None = None) -> tuple[list[ctl.Control], list[Image.Image]]:
    """The enabled units of ``alwayson_scripts`` as Control units, and the detected maps A1111 appends to the
    response images (units with ``save_detected_map``). A unit without an image uses ``init_image`` (img2img),
    as the extension does."""
    script = next((v for k, v in (alwayson or {}).items() if k.lower() == "controlnet"), None)
    if script is None:
        return [], []
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise InvalidRequest("alwayson_scripts.controlnet: expected {\"args\": [unit, ...]}")
    controls, maps = [], []
    for i, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        if unit is None:
            continue
        if not isinstance(unit, dict):
            raise InvalidRequest(f"{where}: a ControlNet unit must be an object")
        unit = {LEGACY.get(k, k): v for k, v in unit.items()}
        if not unit.get("enabled", False):
            continue
        control = _control(unit, where, checkpoint, width, height, init_image)
        controls.append(control)
        if unit.get("save_detected_map", True):
            chw = ctl.control_map(control, width, height)[0]
            maps.append(Image.fromarray((chw.transpose(1, 2, 0) * 255.0).round().astype(np.uint8)))
    return controls, maps


def _control(unit: dict, where: str, checkpoint: Checkpoint, width: int, height: int,
             init_image: Image.Image | None) -> ctl.Control:
    module = str(unit.get("module") or "none").strip().lower()
    if module not in MODULES:
        raise InvalidRequest(f"{where}.module: module({unit.get('module')}) not found in supported modules; "
                             f"sdrt runs {', '.join(MODULES)}. Run another preprocessor yourself and send its "
                             "output with module 'none'")
    model = resolve(unit.get("model", "None"), checkpoint, where)
    weight = _number(unit, "weight", 1.0, where)
    if not 0.0 <= weight <= 2.0:
        raise InvalidRequest(f"{where}.weight must be in [0, 2], not {weight}")
    if unit.get("hr_option", "Both") not in ("Both", 0):
        raise InvalidRequest(f"{where}.hr_option: sdrt applies a unit to both hires passes; send 'Both'")
    if unit.get("advanced_weighting") or unit.get("effective_region_mask") is not None \
            or unit.get("ipadapter_input") is not None:
        raise InvalidRequest(f"{where}: advanced_weighting, effective_region_mask and ipadapter_input are not "
                             "supported by sdrt")
    resize_mode = unit.get("resize_mode", "Crop and Resize")
    resize_mode = 0 if resize_mode == 3 else RESIZE_ALIASES.get(resize_mode, resize_mode)  # 3: latent upscale
    control = ctl.Control(image=_image(unit, where, init_image), model=model, scale=weight,
                          start=_number(unit, "guidance_start", 0.0, where),
                          end=_number(unit, "guidance_end", 1.0, where), resize_mode=resize_mode,
                          control_mode=unit.get("control_mode", "Balanced"))
    if module == "none":
        return control
    rgb = control.image
    if unit.get("pixel_perfect"):
        res = pixel_perfect_resolution(rgb.shape[0], rgb.shape[1], width, height, control.resize_mode)
    else:
        res = _slider(_number(unit, "processor_res", -1, where), RESOLUTION)
    low, high = (_slider(_number(unit, key, -1, where), limits)
                 for key, limits in zip(("threshold_a", "threshold_b"), CANNY))
    return replace(control, image=canny(rgb, res, low, high), preprocessor="canny", processed=True,
                   low_threshold=low, high_threshold=high)


def _image(unit: dict, where: str, init_image: Image.Image | None) -> Image.Image:
    """The unit's image: base64, {"image": b64, "mask": ...} or [image, mask]."""
    image, mask = unit.get("image"), unit.get("mask")
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, (list, tuple)) and len(image) == 2:
        image, mask = image
    if mask:
        raise InvalidRequest(f"{where}: a mask is read only by inpaint preprocessors, which sdrt does not run; "
                             "send the unit without a mask")
    if not image:
        if init_image is None:
            raise InvalidRequest(f"{where}.image: ControlNet is enabled but no input image is given")
        return init_image
    return decode_image(image, f"{where}.image")


def _number(unit: dict, key: str, default: float, where: str) -> float:
    value = unit.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{where}.{key} must be a number, not {value!r}")
    return value


def _slider(value: float, limits: tuple[int, int, int]) -> int:
    """The extension's ``bound_check_params``: a value outside the slider's range means its default."""
    default, lo, hi = limits
    return int(value) if lo <= value <= hi else default


def pixel_perfect_resolution(raw_h: int, raw_w: int, width: int, height: int, resize_mode: str) -> int:
    """The preprocessor resolution matching the generation size (the extension's pixel-perfect mode)."""
    k0, k1 = height / raw_h, width / raw_w
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(np.round(k * min(raw_h, raw_w)))


def canny(rgb: np.ndarray, resolution: int, low: float, high: float) -> np.ndarray:
    """sd-webui-controlnet's canny preprocessor: H' x W' edges (0/255) at ``resolution`` on the short side."""
    cv2 = _cv2()
    h, w = rgb.shape[:2]
    k = resolution / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    scaled = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(scaled, [[0, -th % 64], [0, -tw % 64], [0, 0]], mode="edge")
    return np.ascontiguousarray(ctl.canny(padded, low, high)[:th, :tw])


def detect(module: str, images: list[str], resolution: float, threshold_a: float,
           threshold_b: float) -> list[Image.Image]:
    """POST /controlnet/detect: the preprocessor's output for each image."""
    module = (module or "").strip().lower()
    if module not in MODULES:
        raise InvalidRequest(f"Module not available: {module!r}; sdrt runs {', '.join(MODULES)}")
    if not images:
        raise InvalidRequest("No image selected: give controlnet_input_images")
    rgbs = [_hwc3(decode_image(b64, f"controlnet_input_images[{i}]")) for i, b64 in enumerate(images)]
    if module == "none":
        return [Image.fromarray(rgb) for rgb in rgbs]
    res = _slider(resolution, RESOLUTION)
    low, high = (_slider(v, limits) for v, limits in zip((threshold_a, threshold_b), CANNY))
    return [Image.fromarray(canny(rgb, res, low, high)) for rgb in rgbs]


def _hwc3(image: Image.Image) -> np.ndarray:
    """H x W x 3 uint8, alpha composited over white (the extension's ``HWC3``)."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise InvalidRequest("the canny preprocessor needs OpenCV: `pip install sdrt[controlnet]`") from None
    return cv2


def module_detail() -> dict:
    """/controlnet/module_list's ``module_detail``: the sliders each preprocessor reads."""
    res, (a, b) = RESOLUTION, CANNY
    sliders = [{"name": "Preprocessor Resolution", "value": res[0], "min": res[1], "max": res[2]},
               {"name": "Canny Low Threshold", "value": a[0], "min": a[1], "max": a[2]},
               {"name": "Canny High Threshold", "value": b[0], "min": b[1], "max": b[2]}]
    return {"none": {"model_free": False, "sliders": []}, "canny": {"model_free": False, "sliders": sliders}}
