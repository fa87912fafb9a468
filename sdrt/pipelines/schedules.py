"""Noise schedules as pure NumPy functions: training alphas, sigma <-> timestep, and the inference
timesteps/sigmas each diffusers scheduler visits (so sdrt's samplers reproduce diffusers' numbers).

Sigmas are k-diffusion / VE noise levels (Karras et al. 2022): x = x0 + sigma * eps, sigma = sqrt((1 - ac) / ac).
"""
import math

import numpy as np

from sdrt.errors import InvalidRequest

SPACINGS = ("leading", "linspace", "trailing")


class Sigma(float):
    """A noise level that also carries the exact UNet timestep diffusers feeds at that level.

    diffusers rounds the timesteps of some Karras schedules (DPM-Solver, UniPC, KDPM2) while keeping
    the unrounded sigma for the scalings; `sigma_to_t` returns the carried `t` so the UNet sees the same
    timestep. Arithmetic on a Sigma gives a plain float, so the carried value never leaks into the math.
    """

    t: float

    def __new__(cls, sigma, t):
        obj = super().__new__(cls, sigma)
        obj.t = float(t)
        return obj


def betas_for_alpha_bar(n, max_beta=0.999):
    """Betas of the cosine schedule, alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2 (Nichol & Dhariwal 2021)."""
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def rescale_zero_terminal_snr(betas):
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Alg. 1)."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    ac = ((sqrt_ac - last) * first / (first - last)) ** 2
    return 1 - np.concatenate([ac[:1], ac[1:] / ac[:-1]])


def alphas_cumprod(config):
    """alpha_bar_t for t = 0..T-1 from a diffusers scheduler config (scheduler.json), as float64.

    Args:
        config: mapping with `beta_start`, `beta_end`, `beta_schedule` (linear | scaled_linear |
            squaredcos_cap_v2), `num_train_timesteps`, optional `trained_betas`, `rescale_betas_zero_snr`.
    """
    n = int(config.get("num_train_timesteps", 1000))
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise InvalidRequest(f"scheduler config: beta_schedule {schedule!r} is not supported; "
                             "use linear, scaled_linear or squaredcos_cap_v2")
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    ac = np.cumprod(1.0 - betas)
    if config.get("rescale_betas_zero_snr"):
        ac[-1] = 2.0**-24  # as diffusers' Euler/DPM/UniPC: keeps the top sigma finite
    return ac


def training_sigmas(ac):
    """VE noise level of every training timestep: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    return np.sqrt((1 - ac) / ac)


def sigma_to_t(sigma, log_sigmas):
    """Timestep of a noise level by linear interpolation in log-sigma (diffusers' `_sigma_to_t`).

    A `Sigma` carries its exact timestep, which is returned as is. Scalars give a float.
    """
    if isinstance(sigma, Sigma):
        return sigma.t
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    t = ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))
    return float(t) if t.ndim == 0 else t


def t_to_sigma(t, ac):
    """Noise level at (possibly fractional) timesteps, interpolating sigma linearly in t as diffusers does."""
    sigmas = training_sigmas(ac)
    return np.interp(t, np.arange(len(sigmas)), sigmas)


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """Noise levels of Karras et al. (2022), eq. 5, with a final 0 appended (n + 1 values)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return np.append((hi + ramp * (lo - hi)) ** rho, 0.0)


def spaced_timesteps(n, spacing, num_train_timesteps=1000, steps_offset=0, round_linspace=False):
    """n descending training timesteps under diffusers' `timestep_spacing` (Lin et al. 2023, Table 2).

    `round_linspace`: DDIM/PNDM/DPM-Solver round linspace timesteps; Euler-type schedulers keep them
    fractional (float32).
    """
    T = num_train_timesteps
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n).round() if round_linspace else np.linspace(0, T - 1, n, dtype=np.float32)
        return t[::-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(n) * (T // n)).round()[::-1] + steps_offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / n).round() - 1
    raise InvalidRequest(f"scheduler config: timestep_spacing {spacing!r} is not supported; use one of {SPACINGS}")


def k_schedule(n, ac, spacing="linspace", steps_offset=0, karras=False, round_t=False, sigma_range=(None, None)):
    """Sigmas (n, no final value) and timesteps of diffusers' Euler / LMS / Heun / KDPM2 schedulers.

    Karras sigmas span the interpolated end points of the spaced schedule (or `sigma_range` when the
    config sets sigma_min/sigma_max); their timesteps come from `sigma_to_t`, rounded for KDPM2 (`round_t`).
    """
    t = spaced_timesteps(n, spacing, len(ac), steps_offset)
    sigmas = t_to_sigma(t, ac)
    if karras:
        lo = sigma_range[0] if sigma_range[0] is not None else sigmas[-1]
        hi = sigma_range[1] if sigma_range[1] is not None else sigmas[0]
        sigmas = karras_sigmas(n, lo, hi)[:-1]
        t = sigma_to_t(sigmas, np.log(training_sigmas(ac)))
        t = t.round() if round_t else t.astype(np.float32).astype(np.float64)
    return sigmas, t


def solver_schedule(n, ac, spacing="linspace", steps_offset=0, karras=False, round_t=True, sigma_range=(None, None)):
    """Sigmas (n, no final value) and integer timesteps of diffusers' DPM-Solver / UniPC schedulers.

    These space n + 1 points and drop the last (except 'trailing'); Karras sigmas span the whole training
    range and their timesteps are rounded (DPMSolverMultistep truncates instead for cosine betas: `round_t`).
    """
    T = len(ac)
    if spacing == "trailing":
        t = spaced_timesteps(n, spacing, T, steps_offset)
    else:
        t = spaced_timesteps(n + 1, spacing, T, steps_offset, round_linspace=True)[:-1]
    if not karras:
        return t_to_sigma(t, ac), t
    train = training_sigmas(ac)
    lo = sigma_range[0] if sigma_range[0] is not None else train[0]
    hi = sigma_range[1] if sigma_range[1] is not None else train[-1]
    sigmas = karras_sigmas(n, lo, hi)[:-1]
    t = sigma_to_t(sigmas, np.log(train))
    return sigmas, t.round() if round_t else np.trunc(t)


def plms_timesteps(n, spacing="leading", num_train_timesteps=1000, steps_offset=0):
    """PNDMScheduler(skip_prk_steps=True) timesteps: the second timestep is repeated (n + 1 model calls)."""
    t = spaced_timesteps(n, spacing, num_train_timesteps, steps_offset, round_linspace=True)[::-1]
    return np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1]


def lcm_timesteps(n, original_steps=50, num_train_timesteps=1000):
    """LCMScheduler timesteps: n of the `original_steps` skipping-step timesteps of Luo et al. (2023)."""
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)].astype(np.float64)


def lcm_boundary(t, timestep_scaling=10.0, sigma_data=0.5):
    """Consistency-model boundary scalings (c_skip, c_out) at timestep t (Song et al. 2023, LCM's discrete form)."""
    t = t * timestep_scaling
    return sigma_data**2 / (t**2 + sigma_data**2), t / (t**2 + sigma_data**2) ** 0.5
