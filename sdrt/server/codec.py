"""Images in A1111 request and response bodies: base64 (raw or data URL) in, base64 PNG with infotext out."""
from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, PngImagePlugin

from ..errors import InvalidRequest


def decode_image(data: str, where: str) -> Image.Image:
    """A base64 image (raw, or a ``data:image/...;base64,`` URL) -> a loaded PIL image."""
    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"{where}: expected a base64-encoded image")
    if data.startswith(("http://", "https://")):
        raise InvalidRequest(f"{where}: sdrt does not fetch image URLs; send the image as base64")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return image
    except (OSError, ValueError, Image.DecompressionBombError):
        raise InvalidRequest(f"{where}: the data is not a readable image") from None


def encode_png(image: Image.Image, text: str) -> str:
    """Base64 PNG with the infotext, if any, in its 'parameters' chunk (A1111's samples_format png)."""
    meta = PngImagePlugin.PngInfo()
    if text:
        meta.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
