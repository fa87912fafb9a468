"""Tiled VAE: decode (or encode) a large image as overlapping tiles blended with linear ramps, so memory
is bounded by the tile size instead of the image size.

Each tile sees only its own neighbourhood, so GroupNorm statistics differ slightly from a whole-image pass
(the same approximation as diffusers' ``enable_vae_tiling``); the overlap hides the seams. The error against
a full decode is measured in tests/pipelines/test_tasks.py.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

TILE = 64          # input cells per tile side (latents: 512 px; pixels: use 512)
OVERLAP = 16       # input cells shared by neighbouring tiles


def tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, scale: float, tile: int = TILE,
          overlap: int = OVERLAP) -> np.ndarray:
    """``run`` over overlapping ``tile``-sized windows of ``x`` (B, C, H, W), blended into one output.

    ``scale`` is the output's size per input cell (8 for a VAE decoder, 1/8 for an encoder). Inputs no
    larger than one tile are run whole.
    """
    h, w = x.shape[2:]
    if h <= tile and w <= tile:
        return run(x)
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    out = weight = None
    for y in ys:
        for x0 in xs:
            part = run(x[:, :, y:y + tile, x0:x0 + tile])
            if out is None:
                out = np.zeros((*part.shape[:2], round(h * scale), round(w * scale)), np.float32)
                weight = np.zeros((round(h * scale), round(w * scale)), np.float32)
            ramp = np.outer(_ramp(part.shape[2], y > 0, y + tile < h, overlap * scale),
                            _ramp(part.shape[3], x0 > 0, x0 + tile < w, overlap * scale))
            oy, ox = round(y * scale), round(x0 * scale)
            out[:, :, oy:oy + part.shape[2], ox:ox + part.shape[3]] += part * ramp
            weight[oy:oy + part.shape[2], ox:ox + part.shape[3]] += ramp
    return out / weight


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``size``: stride ``tile - overlap``, the last tile flush with the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n: int, rise: bool, fall: bool, width: float) -> np.ndarray:
    """1 in the middle, rising linearly from near 0 over ``width`` at a side shared with a neighbour."""
    width = max(int(round(width)), 1)
    r = np.ones(n, np.float32)
    edge = (np.arange(width, dtype=np.float32) + 0.5) / width
    if rise:
        r[:width] = np.minimum(r[:width], edge)
    if fall:
        r[n - width:] = np.minimum(r[n - width:], edge[::-1])
    return r
