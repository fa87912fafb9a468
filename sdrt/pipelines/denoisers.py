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
    """An eps- or v-predicting UNet as D(x, sigma) for several text conditions at once (Karras et al. 2022, §B).

    ``cond(step)`` gives the condition blocks in effect at model evaluation ``step`` (0, 1, ... counted by
    this object), each (B, S, D): [uncond; cond] for guidance, more with ``AND``. The result stacks one
    prediction per block along the batch axis, in the same order. Consecutive blocks of one token count
    share a UNet call; a block of another length (a longer negative prompt) gets its own, as in A1111.
    """
    unet: Runtime
    log_sigmas: np.ndarray
    cond: Callable[[int], list[np.ndarray]]
    prediction_type: str = "epsilon"
    concat: np.ndarray | None = None       # 9-channel inpaint UNet: mask ⊕ masked-image latents (B, 5, h, w)
    added: Callable[[int], list[dict[str, np.ndarray]]] | None = None   # SDXL: more UNet inputs per block
    timestep_cond: np.ndarray | None = None    # LCM-distilled UNet: the guidance-scale embedding (B, TC)
    step: int = 0

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        blocks = self.cond(self.step)
        added = self.added(self.step) if self.added is not None else [{}] * len(blocks)
        self.step += 1
        xin = (x / np.sqrt(sigma ** 2 + 1.0)).astype(np.float32)
        if self.concat is not None:
            xin = np.concatenate([xin, self.concat], axis=1)
        t = np.float32(sigma_to_t(sigma, self.log_sigmas))
        outs, first = [], 0
        for group in _same_length_runs(blocks):
            extra, first = added[first:first + len(group)], first + len(group)
            feeds = {"sample": np.concatenate([xin] * len(group)), "timestep": np.full(len(x) * len(group), t),
                     "encoder_hidden_states": np.concatenate(group),
                     **{k: np.concatenate([e[k] for e in extra]) for k in extra[0]}}
            if self.timestep_cond is not None:
                feeds["timestep_cond"] = np.concatenate([self.timestep_cond] * len(group))
            outs.append(self.unet.run(feeds)["out_sample"])
        out = np.concatenate(outs).astype(np.float32)
        xs = np.concatenate([x] * len(blocks))
        if self.prediction_type == "v_prediction":
            return xs / (sigma ** 2 + 1.0) - out * (sigma / np.sqrt(sigma ** 2 + 1.0))
        return xs - sigma * out


def guidance_embedding(w: float, dim: int, batch: int) -> np.ndarray:
    """(batch, dim) sinusoidal embedding of 1000 * w, the guidance input of LCM-distilled UNets (Luo et al. 2023;
    diffusers' ``get_guidance_scale_embedding``, computed in float32 as there)."""
    half = dim // 2
    exponents = np.arange(half, dtype=np.float32) * -(np.log(np.float32(10000.0)) / np.float32(half - 1))
    freqs = np.exp(exponents.astype(np.float64)).astype(np.float32)     # rounded once, as torch's float32 exp
    emb = np.float32(w) * np.float32(1000.0) * freqs
    emb = np.concatenate([np.sin(emb), np.cos(emb), np.zeros(dim % 2, np.float32)]).astype(np.float32)
    return np.repeat(emb[None], batch, axis=0)


def _same_length_runs(blocks: list[np.ndarray]) -> list[list[np.ndarray]]:
    runs: list[list[np.ndarray]] = []
    for b in blocks:
        if runs and runs[-1][0].shape == b.shape:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def guided(denoise: Denoise, scale: float, weights: tuple[float, ...] | list[float] = (1.0,)) -> Denoise:
    """Classifier-free guidance (Ho & Salimans 2022) over a denoiser returning [uncond; cond_1; ...]:
    uncond + scale * sum_i w_i (cond_i - uncond), composable diffusion for A1111's ``AND`` (Liu et al. 2022)."""
    def d(x, sigma):
        uncond, *conds = np.split(denoise(x, sigma), 1 + len(weights))
        return uncond + scale * sum(w * (c - uncond) for w, c in zip(weights, conds))
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
