"""Resizing for the two-pass tasks: latents the way torch's ``interpolate`` does it (A1111's latent
upscalers), images with Pillow, and the hires-fix upscaler names A1111 uses.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# A1111 hires-fix upscaler -> ("latent", interpolate mode) or ("image", Pillow filter)
UPSCALERS = {
    "Latent": ("latent", "bilinear"),
    "Latent (nearest)": ("latent", "nearest"),
    "Latent (nearest-exact)": ("latent", "nearest-exact"),
    "None": ("image", Image.Resampling.LANCZOS),
    "Lanczos": ("image", Image.Resampling.LANCZOS),
    "Nearest": ("image", Image.Resampling.NEAREST),
}


def latents(x: np.ndarray, height: int, width: int, mode: str = "bilinear") -> np.ndarray:
    """(B, C, h, w) -> (B, C, height, width), as ``torch.nn.functional.interpolate(x, size, mode)`` with
    ``align_corners=False`` and no antialiasing."""
    if mode == "bilinear":
        (y0, y1, wy), (x0, x1, wx) = _linear(x.shape[2], height), _linear(x.shape[3], width)
        rows = x[:, :, y0] * (1 - wy)[:, None] + x[:, :, y1] * wy[:, None]
        return (rows[..., x0] * (1 - wx) + rows[..., x1] * wx).astype(x.dtype)
    ys, xs = _nearest(x.shape[2], height, mode), _nearest(x.shape[3], width, mode)
    return x[:, :, ys][..., xs]


def _linear(size: int, out: int):
    """Source indices and weights of bilinear sampling at half-pixel centres (torch's ``align_corners=False``)."""
    src = np.maximum((np.arange(out) + 0.5) * (size / out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), size - 1)
    return lo, np.minimum(lo + 1, size - 1), (src - lo).astype(np.float32)


def _nearest(size: int, out: int, mode: str) -> np.ndarray:
    scale = np.float32(size / out)
    pos = np.arange(out, dtype=np.float32) + (np.float32(0.5) if mode == "nearest-exact" else np.float32(0))
    return np.minimum(np.floor(pos * scale).astype(np.int64), size - 1)
