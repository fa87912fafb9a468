"""The UNet seen as a denoiser D(x, sigma) -> x0 in k-diffusion's VE space, and the wrappers around it.

Classifier-free guidance and 4-channel inpainting are small wrappers, not separate pipelines.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..runtimes.base import Runtime
from .schedules import sigma_to_t

Denoise = Callable[[np.ndarray, float], np.ndarray]


@dataclass
class ModelDenoiser:
    """An eps- or v-predicting UNet as D(x, sigma) for every text condition at once (Karras et al. 2022, §B).

    ``cond`` holds k blocks of B embeddings ([uncond; cond] for guidance); the result stacks the k
    predictions along the batch axis in the same order.
    """
    unet: Runtime
    log_sigmas: np.ndarray
    cond: np.ndarray
    prediction_type: str = "epsilon"
    concat: np.ndarray | None = None       # 9-channel inpaint UNet: mask ⊕ masked-image latents, per cond

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        xs = np.concatenate([x] * (len(self.cond) // len(x)))
        xin = (xs / np.sqrt(sigma ** 2 + 1.0)).astype(np.float32)
        if self.concat is not None:
            xin = np.concatenate([xin, self.concat], axis=1)
        t = np.full(len(xin), sigma_to_t(sigma, self.log_sigmas), dtype=np.float32)
        out = self.unet.run({"sample": xin, "timestep": t, "encoder_hidden_states": self.cond})["out_sample"]
        out = out.astype(np.float32)
        if self.prediction_type == "v_prediction":
            return xs / (sigma ** 2 + 1.0) - out * (sigma / np.sqrt(sigma ** 2 + 1.0))
        return xs - sigma * out


def guided(denoise: Denoise, scale: float) -> Denoise:
    """Classifier-free guidance (Ho & Salimans 2022) over a denoiser returning [uncond; cond]."""
    def d(x, sigma):
        uncond, cond = np.split(denoise(x, sigma), 2)
        return uncond + scale * (cond - uncond)
    return d


def masked(denoise: Denoise, mask: np.ndarray, x0: np.ndarray, noise: np.ndarray, sigma_start: float) -> Denoise:
    """4-channel inpainting: outside ``mask`` the model sees the original latents noised to sigma.

    This is diffusers' per-step blend moved to the model input: every evaluation after the first sees
    ``x0 + sigma * noise`` where mask == 0, so the masked region evolves exactly as in diffusers; the caller
    pastes ``x0`` back after the last step.
    """
    def d(x, sigma):
        if sigma < sigma_start:
            x = mask * x + (1.0 - mask) * (x0 + sigma * noise)
        return denoise(x, sigma)
    return d
