"""Samplers as small NumPy functions over a denoiser, k-diffusion style, plus `plan()`, which turns an
A1111 sampler name into the exact noise levels the equivalent diffusers scheduler visits.

Every sampler works in VE space (x = x0 + sigma * eps) on `denoise(x, sigma) -> x0`. Where diffusers'
schedulers have quirks (leading-spacing init noise, PLMS warm-up, DDIM steps that land off the next
timestep, LMS img2img orders, rounded Karras timesteps) the plan reproduces them, so results match
diffusers to float rounding (see tests/pipelines/test_samplers.py).
"""
import math
import numbers
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np

from sdrt.errors import InvalidRequest
from sdrt.pipelines import schedules
from sdrt.pipelines.schedules import Sigma


def _report(callback, i, x, denoised):
    if callback is not None:
        callback(i, x, denoised)


def _to_d(x, sigma, denoised):
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def _reread(x, sigma_from, sigma_to):
    """Re-read the VP sample diffusers holds for level sigma_from as level sigma_to (identity in VP space)."""
    return x if sigma_from == sigma_to else x * math.sqrt((1 + sigma_to**2) / (1 + sigma_from**2))


def ancestral_step(sigma_from, sigma_to):
    """Split a step into a deterministic part down to sigma_down plus fresh noise sigma_up (kd, eta=1)."""
    sigma_up = math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def log_midpoint(sigma, sigma_next):
    """Geometric mean of two noise levels, DPM-Solver-2's intermediate point."""
    return math.exp(math.log(sigma) + 0.5 * (math.log(sigma_next) - math.log(sigma)))


# ----------------------------------------------------------------------------------------------------
# k-diffusion samplers (Euler, Euler a, Heun, DPM2, DPM2 a, LMS)

def sample_euler(denoise, x, sigmas, callback=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Alg. 2, no churn)."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        _report(callback, i, x, denoised)
    return x


def sample_euler_ancestral(denoise, x, sigmas, noise, callback=None):
    """Ancestral Euler (Song et al. 2021 / kd): Euler to sigma_down, then add sigma_up of fresh noise."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        x = x + noise() * sigma_up  # diffusers draws on the last step too
        _report(callback, i, x, denoised)
    return x


def sample_heun(denoise, x, sigmas, callback=None):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1, no churn); Euler for the step to sigma = 0."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, x, denoised)
    return x


def _dpm_2_step(denoise, x, d, sigma, sigma_to):
    """One DPM-Solver-2 step from sigma to sigma_to, with the slope taken at their log-midpoint."""
    sigma_mid = log_midpoint(sigma, sigma_to)
    x_2 = x + d * (sigma_mid - sigma)
    return x + _to_d(x_2, sigma_mid, denoise(x_2, sigma_mid)) * (sigma_to - sigma)


def sample_dpm_2(denoise, x, sigmas, callback=None):
    """DPM-Solver-2 in sigma (Lu et al. 2022 as kd's sample_dpm_2); Euler for the step to sigma = 0."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x - d * sigmas[i]
        else:
            x = _dpm_2_step(denoise, x, d, sigmas[i], sigmas[i + 1])
        _report(callback, i, x, denoised)
    return x


def sample_dpm_2_ancestral(denoise, x, sigmas, noise, callback=None):
    """Ancestral DPM-Solver-2 (kd's sample_dpm_2_ancestral); like diffusers, no noise on the last step."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = x - d * sigmas[i]
        else:
            x = _dpm_2_step(denoise, x, d, sigmas[i], sigma_down) + noise() * sigma_up
        _report(callback, i, x, denoised)
    return x


def lms_coefficient(sigmas, i, j, order):
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis of node sigmas[i-j] on sigmas[i-order+1..i]."""
    nodes = [sigmas[i - k] for k in range(order)]
    others = [nodes[k] for k in range(order) if k != j]
    basis = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
    basis = basis / np.prod([nodes[j] - o for o in others])
    integral = basis.integ()
    return integral(sigmas[i + 1]) - integral(sigmas[i])


def sample_lms(denoise, x, sigmas, order=4, sigmas_before=(), callback=None):
    """Linear multistep on the probability-flow ODE (kd's sample_lms).

    `sigmas_before`: schedule levels before sigmas[0]. diffusers' img2img keeps the order and Lagrange
    nodes of the full schedule even though it has no derivatives there yet.
    """
    full = np.concatenate([np.asarray(sigmas_before, dtype=np.float64), sigmas])
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        ds = [_to_d(x, sigmas[i], denoised)] + ds[: order - 1]
        k = len(sigmas_before) + i
        cur_order = min(k + 1, order)
        coeffs = [lms_coefficient(full, k, j, cur_order) for j in range(min(cur_order, len(ds)))]
        x = x + sum(c * d for c, d in zip(coeffs, ds))
        _report(callback, i, x, denoised)
    return x


# ----------------------------------------------------------------------------------------------------
# timestep samplers written in sigma (DDIM, PLMS, LCM)

def sample_ddim(denoise, x, sigmas, sigmas_to=None, callback=None):
    """DDIM, eta = 0 (Song et al. 2021): an Euler step in sigma.

    diffusers steps from t to t - T // n, which with 'linspace'/'trailing' spacing can miss the next
    timestep; `sigmas_to[i]` is that landing level and the sample is then re-read at sigmas[i + 1].
    """
    sigmas_to = sigmas[1:] if sigmas_to is None else sigmas_to
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        x = denoised + _to_d(x, sigmas[i], denoised) * sigmas_to[i]
        x = _reread(x, sigmas_to[i], sigmas[i + 1])
        _report(callback, i, x, denoised)
    return x


_ADAMS_BASHFORTH = ([1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def _model_output(x, sigma, denoised, v_prediction):
    """The UNet output behind a denoised estimate: eps, or v for v-prediction models (Salimans & Ho 2022)."""
    if not v_prediction:
        return _to_d(x, sigma, denoised)
    c = 1 / math.sqrt(1 + sigma**2)
    return (c * c * x - denoised) / (sigma * c)


def _output_to_eps(out, x, sigma, v_prediction):
    """eps implied by a (possibly combined) UNet output read at level sigma with sample x."""
    if not v_prediction:
        return out
    c = 1 / math.sqrt(1 + sigma**2)
    return c * out + sigma * c * c * x


def sample_plms(denoise, x, sigmas, sigmas_from, sigmas_to, v_prediction=False, callback=None):
    """PLMS (Liu et al. 2022; PNDM with skip_prk_steps) exactly as diffusers runs it, one entry per model call.

    Call c reads the sample at sigmas[c] and moves it by an Adams-Bashforth combination of the model
    outputs from sigmas_from[c] to sigmas_to[c] (a DDIM transfer, i.e. Euler in sigma). Call 1 is
    diffusers' warm-up: it re-does step 0 from its start with the mean of both outputs and is not kept.
    diffusers combines raw UNet outputs, so a v-prediction model's v (not eps) is what gets combined.
    """
    level, outputs = sigmas[0], []
    for c, sigma in enumerate(sigmas):
        x, level = _reread(x, level, sigma), sigma
        denoised = denoise(x, sigma)
        out = _model_output(x, sigma, denoised, v_prediction)
        if c == 0:
            start = x, level
        if c == 1:
            out, (x, level) = (out + outputs[0]) / 2, start
        else:
            outputs = [out] + outputs[:3]
            out = sum(k * o for k, o in zip(_ADAMS_BASHFORTH[len(outputs) - 1], outputs))
        x = _reread(x, level, sigmas_from[c])
        x = x + (sigmas_to[c] - sigmas_from[c]) * _output_to_eps(out, x, sigmas_from[c], v_prediction)
        level = sigmas_to[c]
        if c > 0 or len(sigmas) == 1:
            _report(callback, max(c - 1, 0), x, denoised)
    return x


def sample_lcm(denoise, x, sigmas, c_skip, c_out, noise, callback=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Alg. 1).

    The consistency function is c_skip * x_vp + c_out * x0 at each step's timestep; then it is re-noised
    to the next level (no noise after the last step).
    """
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        denoised = c_skip[i] * x / math.sqrt(1 + sigmas[i] ** 2) + c_out[i] * denoised
        x = denoised
        if i < len(sigmas) - 2:
            x = x + noise() * sigmas[i + 1]
        _report(callback, i, x, denoised)
    return x


# ----------------------------------------------------------------------------------------------------
# DPM-Solver++ and UniPC (multistep solvers in lambda = -log sigma)

def sample_dpmpp_2m(denoise, x, sigmas, euler_last=True, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), midpoint form; first order on the first and,
    with `euler_last` (diffusers' lower_order_final / final sigma 0), the last step."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])
            d = denoised
            if old_denoised is not None and not (euler_last and i == len(sigmas) - 2):
                d = denoised + (denoised - old_denoised) / (2 * h_last / h)
            x = sigmas[i + 1] / sigmas[i] * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


def sample_dpmpp_2m_sde(denoise, x, sigmas, noise, euler_last=True, callback=None):
    """DPM-Solver++(2M) SDE (Lu et al. 2022; kd's sample_dpmpp_2m_sde, eta = 1, midpoint).
    diffusers draws noise on every step, the last one too."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        z = noise()
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])
            d = denoised
            if old_denoised is not None and not (euler_last and i == len(sigmas) - 2):
                d = denoised + (denoised - old_denoised) / (2 * h_last / h)
            x = sigmas[i + 1] / sigmas[i] * math.exp(-h) * x - math.expm1(-2 * h) * d
            x = x + sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h)) * z
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


def sample_dpmpp_2s(denoise, x, sigmas, orders, callback=None):
    """Singlestep DPM-Solver++(2S) (Lu et al. 2022, Alg. 1) as diffusers' DPMSolverSinglestepScheduler runs it:
    an order-2 step restarts from the previous level, using the previous step's point as its midpoint."""
    x_start, old_denoised = x, None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if orders[i] == 1:
            x_start, s, d = x, sigmas[i], denoised
        else:
            s = sigmas[i - 1]
            r = math.log(s / sigmas[i]) / math.log(s / sigmas[i + 1])
            d = old_denoised + (denoised - old_denoised) / (2 * r)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = sigmas[i + 1] / s * x_start - math.expm1(-math.log(s / sigmas[i + 1])) * d
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


def _unipc_update(x, history, sigma_next, order, variant, denoised_next=None):
    """One UniPC step (Zhao et al. 2023) from history[-1]'s level to sigma_next on the data prediction:
    the UniP predictor, or, given the model's output at sigma_next, the UniC corrector.

    history: [(sigma, denoised), ...], newest last; uses the newest `order` (corrector) entries.
    """
    s0, m0 = history[-1]
    if sigma_next == s0:  # a final level equal to the last one (Karras + final_sigmas_type 'sigma_min')
        return x
    h = math.inf if sigma_next == 0 else math.log(s0 / sigma_next)
    past = history[-2::-1][: order - 1]
    rks = np.array([math.log(s0 / s) / h for s, _ in past] + [1.0])
    d1s = [(m - m0) / rk for (_, m), rk in zip(past, rks)]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.stack([rks ** (i - 1) for i in range(1, order + 1)])
    x = sigma_next / s0 * x - h_phi_1 * m0
    if denoised_next is None:
        rhos = [0.5] if order == 2 else (np.linalg.solve(R[:-1, :-1], b[:-1]) if order > 2 else [])
        return x - b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
    return x - b_h * (sum(r * d for r, d in zip(rhos[:-1], d1s)) + rhos[-1] * (denoised_next - m0))


def sample_unipc(denoise, x, sigmas, order=2, variant="bh2", lower_order_final=True, callback=None):
    """UniPC multistep sampler (Zhao et al. 2023), diffusers' UniPCMultistepScheduler with predict_x0:
    warm-up orders 1..order, lower order toward the end, UniC corrector before every predictor but the first."""
    history, x_prev, prev_order = [], None, 0
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, sigmas[i])
        if x_prev is not None:
            x = _unipc_update(x_prev, history, sigmas[i], prev_order, variant, denoised_next=denoised)
        history = (history + [(sigmas[i], denoised)])[-order:]
        prev_order = min(order, n - i if lower_order_final else order, len(history))
        x_prev, x = x, _unipc_update(x, history, sigmas[i + 1], prev_order, variant)
        _report(callback, i, x, denoised)
    return x


# ----------------------------------------------------------------------------------------------------
# names, diffusers equivalents and plans

KARRAS = " Karras"
BASE_NAMES = ("Euler", "Euler a", "DDIM", "PLMS", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE",
              "DPM++ SDE", "UniPC", "LCM")
KARRAS_NAMES = ("Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "UniPC")
SAMPLER_NAMES = BASE_NAMES + tuple(name + KARRAS for name in KARRAS_NAMES)
SCHEDULER_NAMES = ("automatic", "karras", "sgm_uniform")    # sgm_uniform: diffusers' "trailing" spacing
NO_TRAILING = ("DPM++ SDE",)        # DPMSolverSinglestepScheduler has no timestep_spacing
ALIASES = {"k_euler": "Euler", "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "ddim": "DDIM",
           "plms": "PLMS", "k_lms": "LMS", "k_heun": "Heun", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a",
           "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m_sde": "DPM++ 2M SDE", "k_dpmpp_sde": "DPM++ SDE",
           "unipc": "UniPC", "k_lcm": "LCM", "lcm": "LCM"}

_SOLVER = {"solver_order": 2, "solver_type": "midpoint"}
DIFFUSERS_EQUIVALENT = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {"clip_sample": False}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", **_SOLVER}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **_SOLVER}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", **_SOLVER}),
    "UniPC": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
    "LCM": ("LCMScheduler", {"clip_sample": False}),
}
DIFFUSERS_EQUIVALENT.update({name + KARRAS: (DIFFUSERS_EQUIVALENT[name][0],
                                              {**DIFFUSERS_EQUIVALENT[name][1], "use_karras_sigmas": True})
                             for name in KARRAS_NAMES})

# diffusers' __init__ defaults for the config keys sdrt reads (used when scheduler.json omits them)
_KD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear"}
CLASS_DEFAULTS = {
    "EulerDiscreteScheduler": {"timestep_spacing": "linspace", "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {"timestep_spacing": "linspace"},
    "DDIMScheduler": {"timestep_spacing": "leading", "set_alpha_to_one": True},
    "PNDMScheduler": {"timestep_spacing": "leading", "set_alpha_to_one": False},
    "LMSDiscreteScheduler": {"timestep_spacing": "linspace"},
    "HeunDiscreteScheduler": {"timestep_spacing": "linspace", **_KD_BETAS},
    "KDPM2DiscreteScheduler": {"timestep_spacing": "linspace", **_KD_BETAS},
    "KDPM2AncestralDiscreteScheduler": {"timestep_spacing": "linspace", **_KD_BETAS},
    "DPMSolverMultistepScheduler": {"timestep_spacing": "linspace", "final_sigmas_type": "zero",
                                    "lower_order_final": True, "euler_at_final": False},
    "DPMSolverSinglestepScheduler": {"final_sigmas_type": "zero", "lower_order_final": False},
    "UniPCMultistepScheduler": {"timestep_spacing": "linspace", "final_sigmas_type": "zero",
                                "lower_order_final": True},
    "LCMScheduler": {"timestep_spacing": "leading", "set_alpha_to_one": True, "original_inference_steps": 50,
                     "timestep_scaling": 10.0, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear"},
}


@dataclass(frozen=True)
class SamplingPlan:
    """The noise levels one sampler visits for one request, and how to run it.

    sigmas: VE levels of x, from the start (img2img noises to sigmas[0]) to the end (sigmas[-1]).
    init_sigma: txt2img start is unit noise * init_sigma (diffusers' init_noise_sigma, in VE terms).
    calls: (sigma, timestep) of each model call in order, i.e. diffusers' `scheduler.timesteps`; `run`
        hands the timestep to the denoiser inside a `Sigma`, so `schedules.sigma_to_t` returns it exactly
        (diffusers rounds some Karras timesteps, and DPM2 a calls twice at one sigma with two timesteps).
    """

    label: str
    sigmas: np.ndarray
    init_sigma: float
    sampler: Callable = field(repr=False)
    calls: tuple = field(default=(), repr=False)
    stochastic: bool = False

    def run(self, denoise, x, noise=None, callback=None):
        """Sample from x (VE, at sigmas[0]) to sigmas[-1]; noise() gives fresh N(0, 1) like x."""
        calls = iter(self.calls)

        def denoise_t(x, sigma):
            sigma_t = next(calls, None)
            if sigma_t is not None and math.isclose(sigma, sigma_t[0], rel_tol=1e-9):
                return denoise(x, Sigma(sigma, sigma_t[1]))
            return denoise(x, float(sigma))

        if not self.stochastic:
            return self.sampler(denoise_t, x, callback=callback)
        if noise is None:
            rng = np.random.default_rng()
            noise = lambda: rng.standard_normal(x.shape).astype(x.dtype)  # noqa: E731
        return self.sampler(denoise_t, x, noise=noise, callback=callback)


def _calls(pairs):
    return tuple((float(sigma), float(t)) for sigma, t in pairs)


def resolve_name(name, scheduler=None):
    """A1111 sampler name (+ optional `scheduler` field) -> a key of DIFFUSERS_EQUIVALENT."""
    base = (name or "").strip()
    karras = base.lower().endswith(KARRAS.lower())
    base = base[: -len(KARRAS)] if karras else base
    by_lower = {n.lower(): n for n in BASE_NAMES}
    base = by_lower.get(base.lower()) or ALIASES.get(base.lower())
    if base is None:
        raise InvalidRequest(f"unknown sampler {name!r}; use one of: {', '.join(SAMPLER_NAMES)}")
    kind = schedule_kind(scheduler)
    if kind not in SCHEDULER_NAMES:
        raise InvalidRequest(f"unknown or unsupported scheduler {scheduler!r}; sdrt supports: "
                             f"{', '.join(SCHEDULER_NAMES)}")
    if kind == "sgm_uniform" and (karras or base in NO_TRAILING):
        raise InvalidRequest(f"sampler {name!r} has no SGM Uniform (trailing) schedule in sdrt; use scheduler "
                             f"'automatic' or a sampler other than {', '.join(NO_TRAILING)}")
    karras = karras or kind == "karras"
    if karras and base not in KARRAS_NAMES:
        raise InvalidRequest(f"sampler {base!r} has no Karras schedule; use scheduler 'automatic', or "
                             f"'karras' with one of: {', '.join(KARRAS_NAMES)}")
    return base + KARRAS if karras else base


def schedule_kind(scheduler):
    """A1111's `scheduler` field as a key: None -> "automatic", "SGM Uniform" -> "sgm_uniform"."""
    return (scheduler or "automatic").strip().lower().replace(" ", "_")


def img2img_start(steps, strength):
    """First step diffusers' img2img runs (StableDiffusionImg2ImgPipeline.get_timesteps)."""
    if not 0 <= strength <= 1:
        raise InvalidRequest(f"denoising strength must be in [0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep < 1:
        raise InvalidRequest(f"denoising strength {strength} x {steps} steps < 1 leaves no step to run; "
                             f"raise strength to at least {1 / steps:.3g} or steps to at least "
                             f"{math.ceil(1 / strength) if strength > 0 else 'any number (strength is 0)'}")
    return max(steps - init_timestep, 0)


def plan(name, steps, config, strength=1.0, scheduler=None):
    """The SamplingPlan for an A1111 sampler name, as its DIFFUSERS_EQUIVALENT would run with `config`.

    Args:
        name: A1111 sampler name ("DPM++ 2M", legacy "DPM++ 2M Karras", or an alias like "k_euler").
        steps: number of inference steps (before img2img truncation).
        config: the model's diffusers scheduler config (scheduler.json) as a dict.
        strength: img2img denoising strength; < 1 keeps the last int(steps * strength) steps.
        scheduler: A1111's `scheduler` field: None, "automatic", "karras" or "sgm_uniform" (A1111's SGM Uniform,
            run as diffusers' timestep_spacing="trailing": SD-Turbo's schedule; LCM gets these as custom timesteps).
    """
    key = resolve_name(name, scheduler)
    if not isinstance(steps, numbers.Integral) or steps < 1:
        raise InvalidRequest(f"steps must be an integer >= 1, got {steps!r}")
    cls, kwargs = DIFFUSERS_EQUIVALENT[key]
    opts = {**CLASS_DEFAULTS[cls], **{k: v for k, v in config.items() if v is not None}, **kwargs}
    if schedule_kind(scheduler) == "sgm_uniform":
        opts |= {"timestep_spacing": "trailing", "sgm_uniform": True}
    ac = schedules.alphas_cumprod(opts)
    if steps > len(ac):
        raise InvalidRequest(f"steps must be <= num_train_timesteps ({len(ac)}), got {steps}")
    start = img2img_start(steps, strength)
    base = key[: -len(KARRAS)] if key.endswith(KARRAS) else key
    return _BUILDERS[base](key, steps, start, opts, ac)


def _sigma_at(t, ac, final):
    """Level of integer timestep t; diffusers' `final_alpha_cumprod` level for t < 0."""
    return final if t < 0 else float(schedules.training_sigmas(ac)[int(t)])


def _final_alpha_sigma(opts, ac):
    return 0.0 if opts.get("set_alpha_to_one") else float(schedules.training_sigmas(ac)[0])


def _k_plan(key, n, start, opts, ac):
    """Euler, Euler a, LMS, Heun, DPM2, DPM2 a: diffusers' Euler-type sigmas (final 0 or sigma_min)."""
    karras = key.endswith(KARRAS)
    base = key[: -len(KARRAS)] if karras else key
    sigmas, t = schedules.k_schedule(
        n, ac, opts["timestep_spacing"], opts.get("steps_offset", 0), karras, round_t=base in ("DPM2", "DPM2 a"),
        sigma_range=(None, None) if base == "LMS" else (opts.get("sigma_min"), opts.get("sigma_max")))
    final = float(schedules.training_sigmas(ac)[0]) if opts.get("final_sigmas_type") == "sigma_min" else 0.0
    full = np.append(sigmas, final)
    log_sigmas, calls = np.log(schedules.training_sigmas(ac)), []
    for i in range(start, n):  # Heun/DPM2 call twice per step; DPM2's midpoint timesteps are not rounded
        calls.append((full[i], t[i]))
        end = ancestral_step(full[i], full[i + 1])[0] if base == "DPM2 a" else full[i + 1]
        if base == "Heun" and end > 0:
            calls.append((end, t[i + 1]))
        elif base in ("DPM2", "DPM2 a") and end > 0:
            mid = log_midpoint(full[i], end)
            calls.append((mid, schedules.sigma_to_t(mid, log_sigmas)))
    init = math.sqrt(sigmas[0] ** 2 + 1) if opts["timestep_spacing"] == "leading" else float(sigmas[0])
    sampler = {"Euler": sample_euler, "Euler a": sample_euler_ancestral, "Heun": sample_heun,
               "DPM2": sample_dpm_2, "DPM2 a": sample_dpm_2_ancestral,
               "LMS": partial(sample_lms, sigmas_before=full[:start])}[base]
    return SamplingPlan(key, full[start:], init, partial(sampler, sigmas=full[start:]), _calls(calls),
                        stochastic=base in ("Euler a", "DPM2 a"))


def _ddim_plan(key, n, start, opts, ac):
    """DDIM: integer timesteps, each step lands on t - T // n (or the final alpha below 0)."""
    t = schedules.spaced_timesteps(n, opts["timestep_spacing"], len(ac), opts.get("steps_offset", 0),
                                   round_linspace=True)[start:]
    final = _final_alpha_sigma(opts, ac)
    sigmas = [_sigma_at(ti, ac, final) for ti in t]
    sigmas_to = np.array([_sigma_at(ti - len(ac) // n, ac, final) for ti in t])
    sigmas = np.append(sigmas, sigmas_to[-1])
    return SamplingPlan(key, sigmas, math.sqrt(1 + sigmas[0] ** 2),
                        partial(sample_ddim, sigmas=sigmas, sigmas_to=sigmas_to),
                        _calls(zip(sigmas[:-1], t)))


def _plms_plan(key, n, start, opts, ac):
    """PLMS: diffusers' per-call (read, from, to) levels, including the warm-up call and img2img's cut."""
    t = schedules.plms_timesteps(n, opts["timestep_spacing"], len(ac), opts.get("steps_offset", 0))[start:]
    ratio, final = len(ac) // n, _final_alpha_sigma(opts, ac)
    t_from = np.array([ti + ratio if c == 1 else ti for c, ti in enumerate(t)])
    t_to = np.array([ti if c == 1 else ti - ratio for c, ti in enumerate(t)])
    at = lambda ts: np.array([_sigma_at(ti, ac, final) for ti in ts])  # noqa: E731
    sigmas, sigmas_from, sigmas_to = at(t), at(t_from), at(t_to)
    levels = np.append(sigmas[:1], sigmas_to[1:] if len(t) > 1 else sigmas_to)
    return SamplingPlan(key, levels, math.sqrt(1 + sigmas[0] ** 2),
                        partial(sample_plms, sigmas=sigmas, sigmas_from=sigmas_from, sigmas_to=sigmas_to,
                                v_prediction=opts.get("prediction_type") == "v_prediction"),
                        _calls(zip(sigmas, t)))


def _solver_plan(key, n, start, opts, ac):
    """DPM++ 2M (SDE), DPM++ SDE (singlestep) and UniPC: VP solvers with integer (or rounded Karras) timesteps."""
    karras = key.endswith(KARRAS)
    base = key[: -len(KARRAS)] if karras else key
    spacing = "linspace" if base == "DPM++ SDE" else opts["timestep_spacing"]  # singlestep ignores spacing
    offset = 0 if base == "DPM++ SDE" else opts.get("steps_offset", 0)
    round_t = not base.startswith("DPM++ 2M") or opts["beta_schedule"] != "squaredcos_cap_v2"
    sigmas, t = schedules.solver_schedule(n, ac, spacing, offset, karras, round_t,
                                          (opts.get("sigma_min"), opts.get("sigma_max")))
    if opts["final_sigmas_type"] == "zero":
        final = 0.0
    else:
        final = float(sigmas[-1] if karras and base == "UniPC" else schedules.training_sigmas(ac)[0])
    full = np.append(sigmas, final)
    euler_last = bool(opts.get("euler_at_final") or (opts["lower_order_final"] and n < 15) or final == 0)
    if base == "UniPC":
        sampler = partial(sample_unipc, order=opts["solver_order"], variant=opts["solver_type"],
                          lower_order_final=bool(opts["lower_order_final"]))
    elif base == "DPM++ SDE":
        sampler = partial(sample_dpmpp_2s, orders=[1] + _singlestep_orders(n, opts)[start + 1:])
    else:
        sampler = partial(sample_dpmpp_2m_sde if base == "DPM++ 2M SDE" else sample_dpmpp_2m, euler_last=euler_last)
    return SamplingPlan(key, full[start:], math.sqrt(1 + sigmas[0] ** 2), partial(sampler, sigmas=full[start:]),
                        _calls(zip(sigmas[start:], t[start:])), stochastic=base == "DPM++ 2M SDE")


def _singlestep_orders(n, opts):
    """DPMSolverSinglestepScheduler.get_order_list for order 2 (lower_order_final is forced on for
    odd n or a final sigma of 0). A run starting at step k (img2img) does step k at order 1."""
    if opts["lower_order_final"] or n % 2 or opts["final_sigmas_type"] == "zero":
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
        orders = [1, 2] * (n // 2)
    if opts["final_sigmas_type"] == "zero":
        orders[-1] = 1
    return orders


def _lcm_plan(key, n, start, opts, ac):
    """LCM: timesteps from original_inference_steps, boundary scalings per step, final level 0."""
    original = int(opts["original_inference_steps"])
    if n > original:
        raise InvalidRequest(f"LCM runs at most original_inference_steps = {original} steps, got {n}")
    if opts.get("sgm_uniform"):
        t = schedules.spaced_timesteps(n, "trailing", len(ac))[start:]
    else:
        t = schedules.lcm_timesteps(n, original, len(ac))[start:]
    sigmas = np.append([_sigma_at(ti, ac, 0.0) for ti in t], 0.0)
    c_skip, c_out = schedules.lcm_boundary(t, opts["timestep_scaling"])
    sampler = partial(sample_lcm, sigmas=sigmas, c_skip=c_skip, c_out=c_out)
    return SamplingPlan(key, sigmas, math.sqrt(1 + sigmas[0] ** 2), sampler, _calls(zip(sigmas[:-1], t)),
                        stochastic=True)


_BUILDERS = {"Euler": _k_plan, "Euler a": _k_plan, "LMS": _k_plan, "Heun": _k_plan, "DPM2": _k_plan,
             "DPM2 a": _k_plan, "DDIM": _ddim_plan, "PLMS": _plms_plan, "DPM++ 2M": _solver_plan,
             "DPM++ 2M SDE": _solver_plan, "DPM++ SDE": _solver_plan, "UniPC": _solver_plan, "LCM": _lcm_plan}
