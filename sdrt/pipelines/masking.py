"""Inpainting masks as A1111 prepares them (modules/masking.py, processing.py): blur, the "Only masked" crop
region, the blur-fill of the masked area, and the overlay that pastes a result into the original image.

Masks are PIL "L" images, white (255) = repaint. NumPy and Pillow only.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..errors import InvalidRequest

INPAINTING_FILL = ("fill", "original", "latent noise", "latent nothing")     # A1111's inpainting_fill 0..3


def fill_mode(value: int | str) -> str:
    """A1111's ``inpainting_fill`` as a name: 0 / "fill", 1 / "original", 2 / "latent noise", 3 / "latent nothing"."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(INPAINTING_FILL):
        return INPAINTING_FILL[value]
    if isinstance(value, str) and value.lower() in INPAINTING_FILL:
        return value.lower()
    raise InvalidRequest(f"inpainting fill {value!r} is not one of 0..3 or {', '.join(INPAINTING_FILL)}")


def prepare(mask: Image.Image, blur: int | tuple[int, int] = 0, invert: bool = False) -> Image.Image:
    """The mask A1111 inpaints with: grey levels (an RGBA mask's alpha, rounded, when it has transparency),
    inverted for "Inpaint not masked", then Gaussian-blurred by ``blur`` pixels (one value, or x and y)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    mask = mask.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    bx, by = (blur, blur) if np.isscalar(blur) else blur
    if bx < 0 or by < 0:
        raise InvalidRequest(f"mask blur must be >= 0, not {blur}")
    a = np.asarray(mask)
    if bx > 0:
        a = gaussian_blur(a, bx, axis=1)
    if by > 0:
        a = gaussian_blur(a, by, axis=0)
    return Image.fromarray(a)


def gaussian_blur(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """A 1-D Gaussian along ``axis`` of a uint8 image as A1111 calls ``cv2.GaussianBlur``: kernel size
    2 * int(2.5 sigma + 0.5) + 1, reflect-101 borders, rounded back to uint8."""
    radius = int(2.5 * sigma + 0.5)
    k = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2.0 * sigma ** 2))
    k /= k.sum()
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius, radius)
    x = np.pad(a.astype(np.float64), pad, mode="reflect")
    n = a.shape[axis]
    out = sum(w * np.take(x, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around every non-zero mask pixel, grown by ``pad`` within the image; None
    for an empty mask (A1111's ``get_crop_region_v2``)."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(box: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """Grow ``box`` to the aspect ratio of the ``width`` x ``height`` it will be processed at, centred and
    shifted back inside the image (A1111's ``expand_crop_region``, integer steps included)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, by: int, size: int) -> tuple[int, int]:
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill 0: the masked area painted with ever finer blurs of the colours around it."""
    keep = Image.new("RGBa", image.size)
    keep.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = keep.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def paste(generated: Image.Image, original: Image.Image, mask: Image.Image,
          box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """``generated`` shown through ``mask`` over ``original`` (A1111's overlay: the original, premultiplied
    by the inverted mask, alpha-composited on top). With ``box``, ``generated`` is first fitted into that
    region (crop and resize) of a canvas the size of ``original``."""
    from .images import resize_image
    top = Image.new("RGBa", original.size)
    top.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    if box is not None:
        x1, y1, x2, y2 = box
        canvas = Image.new("RGBA", original.size)
        canvas.paste(resize_image(generated, 1, x2 - x1, y2 - y1), (x1, y1))
        generated = canvas
    out = generated.convert("RGBA")
    out.alpha_composite(top.convert("RGBA"))
    return out.convert("RGB")


def overlay_mask(mask: Image.Image) -> Image.Image:
    """A1111's "Whole picture" overlay mask: the blurred mask doubled, so the seam is mostly generated."""
    return Image.fromarray(np.clip(np.asarray(mask.convert("L"), np.float32) * 2, 0, 255).astype(np.uint8))
