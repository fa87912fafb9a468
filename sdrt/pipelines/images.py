"""Image I/O at the pipeline boundary: PIL <-> arrays, masks, A1111 infotext in PNG files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..errors import InvalidRequest


def open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"{path}: not a readable image ({e})") from None


def to_array(image: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1]; resized with Lanczos when the size differs (as diffusers does)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    x = np.asarray(image, dtype=np.float32) / 255.0
    return (x.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def mask_array(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 1, H, W) binary float32 mask, 1 = repaint (white), as diffusers' mask processor binarizes it."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    m = np.asarray(mask, dtype=np.float32) / 255.0
    return (m >= 0.5).astype(np.float32)[None, None]


RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")


def resize_mode(value: int | str) -> int:
    """A1111's img2img ``resize_mode`` as its number: 0..3 or one of ``RESIZE_MODES`` (any case)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(RESIZE_MODES):
        return value
    names = [m.lower() for m in RESIZE_MODES]
    if isinstance(value, str) and value.lower() in names:
        return names.index(value.lower())
    raise InvalidRequest(f"resize_mode {value!r} is not one of 0..3 or {', '.join(map(repr, RESIZE_MODES))}")


def resize_image(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's ``images.resize_image`` (Lanczos): 0 stretch to ``width`` x ``height``; 1 cover it, keeping the
    aspect ratio, and crop the centre; 2 (and 3) fit inside it and stretch the edge rows/columns into the bands."""
    if mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        w = width if ratio > src_ratio else image.width * height // image.height
        h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        w = width if ratio < src_ratio else image.width * height // image.height
        h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((w, h), Image.LANCZOS)
    out = Image.new("RGB" if image.mode != "L" else "L", (width, height))
    out.paste(resized, (width // 2 - w // 2, height // 2 - h // 2))
    if mode != 1 and ratio < src_ratio and height // 2 - h // 2 > 0:
        band = height // 2 - h // 2
        out.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
        out.paste(resized.resize((width, band), box=(0, h, width, h)), (0, band + h))
    elif mode != 1 and ratio > src_ratio and width // 2 - w // 2 > 0:
        band = width // 2 - w // 2
        out.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(resized.resize((band, height), box=(w, 0, w, height)), (band + w, 0))
    return out


def extend(image: Image.Image, left: int, right: int, top: int, bottom: int,
           overlap: int) -> tuple[Image.Image, Image.Image]:
    """``image`` on a larger canvas, the new pixels repeating the nearest edge, and the outpainting mask:
    white over the new area and ``overlap`` pixels into the image along each extended side."""
    a = np.asarray(image.convert("RGB"))
    h, w = a.shape[:2]
    canvas = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, np.uint8)
    keep_y = slice(top + (overlap if top else 0), top + h - (overlap if bottom else 0))
    keep_x = slice(left + (overlap if left else 0), left + w - (overlap if right else 0))
    mask[keep_y, keep_x] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, 3, H, W) decoder output in [-1, 1] -> PIL images, rounded as diffusers' postprocess rounds."""
    x = np.clip(images / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [Image.fromarray(a) for a in (x * 255.0).round().astype(np.uint8)]


def infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """A1111's generation-parameters text: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def _quote(value) -> str:
    """A1111's ``quote``: values holding ',', ':' or a newline are written as JSON strings."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def save_png(image: Image.Image, path: str | Path, text: str) -> None:
    """Save with the infotext in a 'parameters' tEXt chunk (where A1111 and its PNG Info read it)."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    image.save(path, pnginfo=meta)
