"""sdrt samplers vs diffusers schedulers on a closed-form fake UNet (CPU, float64 vs diffusers' float32).

For each A1111 sampler name (and Karras variant), step count and img2img strength, the diffusers scheduler
loop (set_timesteps / scale_model_input / step, torch CPU generator) and `samplers.plan(...).run` drive the
same analytic model; ancestral noise comes from identically seeded torch generators, so the streams line
up. Final VP latents must agree to 1e-4 relative (the residual is diffusers' float32 arithmetic).
"""
import inspect
import math

import numpy as np
import pytest

from sdrt.errors import InvalidRequest
from sdrt.pipelines import samplers, schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 vs diffusers' tensor -> array

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
CONFIGS = {
    "sd15": SD15,  # no timestep_spacing: each scheduler class uses its own default
    "v-trailing": {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
                   "timestep_spacing": "trailing"},
    "linspace": {**SD15, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "linspace", "steps_offset": 0},
    "leading": {**SD15, "timestep_spacing": "leading"},
}
SHAPE = (1, 4, 8, 8)
RTOL = 1e-4


def fake_unet(x_vp, t):
    """Closed-form stand-in for a UNet: eps (or v) of the VP sample at timestep t."""
    return np.tanh(0.7 * x_vp) * math.cos(t / 400) + 0.1 * x_vp


def fake_denoiser(config):
    """The fake UNet as sdrt's pipeline sees it: D(x, sigma) -> x0 in VE space, t from sigma_to_t."""
    log_sigmas = np.log(schedules.training_sigmas(schedules.alphas_cumprod(config)))
    v_prediction = config.get("prediction_type") == "v_prediction"

    def denoise(x, sigma):
        assert isinstance(sigma, float)
        c_in = 1 / math.sqrt(1 + sigma**2)
        out = fake_unet(x * c_in, schedules.sigma_to_t(sigma, log_sigmas))
        return x / (1 + sigma**2) - sigma * c_in * out if v_prediction else x - sigma * out
    return denoise


def run_diffusers(name, config, steps, strength, x0, noise, generator):
    """StableDiffusion(Img2Img)Pipeline's scheduler loop around the fake UNet; returns final latents."""
    cls, kwargs = samplers.DIFFUSERS_EQUIVALENT[name]
    scheduler = getattr(diffusers, cls).from_config(config, **kwargs)
    scheduler.set_timesteps(steps)
    noise = torch.from_numpy(noise).float()
    if strength == 1:
        timesteps = scheduler.timesteps
        latents = noise * scheduler.init_noise_sigma
    else:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        latents = scheduler.add_noise(torch.from_numpy(x0).float(), noise, timesteps[:1])
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        out = torch.from_numpy(fake_unet(model_input.double().numpy(), float(t))).float()
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
    return latents.double().numpy()


def run_sdrt(name, config, steps, strength, x0, noise, generator):
    """The sdrt pipeline's use of a plan: start, run, convert VE -> VP latents."""
    plan = samplers.plan(name, steps, config, strength)
    x = noise * plan.init_sigma if strength == 1 else x0 + plan.sigmas[0] * noise
    fresh = lambda: torch.randn(SHAPE, generator=generator, dtype=torch.float32).double().numpy()  # noqa: E731
    steps_seen = []
    x = plan.run(fake_denoiser(config), x, noise=fresh, callback=lambda i, x, d: steps_seen.append(i))
    assert steps_seen == list(range(len(plan.sigmas) - 1))
    return x / math.sqrt(1 + plan.sigmas[-1] ** 2)


def parity_cases():
    for name in samplers.DIFFUSERS_EQUIVALENT:
        for config in CONFIGS:
            for steps in (1, 4, 7, 10) if config in ("v-trailing", "linspace") else (1, 4, 10):
                for strength in (1.0, 0.6):
                    if int(steps * strength) >= 1:
                        yield pytest.param(name, config, steps, strength, id=f"{name}-{config}-{steps}-{strength}")


@pytest.mark.parametrize("name,config,steps,strength", list(parity_cases()))
def test_matches_diffusers(name, config, steps, strength):
    if name.startswith("LMS"):
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")
    x0 = np.random.default_rng(0).standard_normal(SHAPE) * 0.5
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).double().numpy()
    ref_gen, sdrt_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    ref = run_diffusers(name, CONFIGS[config], steps, strength, x0, noise, ref_gen)
    got = run_sdrt(name, CONFIGS[config], steps, strength, x0, noise, sdrt_gen)
    assert np.abs(got - ref).max() <= RTOL * max(1.0, np.abs(ref).max())
    assert torch.equal(ref_gen.get_state(), sdrt_gen.get_state()), "noise() calls differ from diffusers' randn"


@pytest.mark.parametrize("config", [{**SD15, "final_sigmas_type": "sigma_min", "timestep_spacing": "linspace"},
                                    {**SD15, "set_alpha_to_one": True, "prediction_type": "v_prediction"}])
@pytest.mark.parametrize("name", ["DDIM", "PLMS", "DPM++ 2M", "DPM++ 2M SDE Karras", "DPM++ SDE", "UniPC Karras"])
def test_final_alpha_and_sigma_min(name, config):
    """Non-zero final levels: DDIM/PLMS final alpha, DPM-Solver/UniPC final_sigmas_type, >= 15 steps."""
    for steps in (3, 15, 16):
        x0 = np.zeros(SHAPE)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).double().numpy()
        ref = run_diffusers(name, config, steps, 1.0, x0, noise, torch.Generator().manual_seed(2))
        got = run_sdrt(name, config, steps, 1.0, x0, noise, torch.Generator().manual_seed(2))
        assert np.abs(got - ref).max() <= RTOL * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM2", "LMS", "DDIM", "PLMS", "DPM++ 2M", "DPM++ SDE", "UniPC",
                                  "DPM++ 2M Karras"])
def test_deterministic_samplers_converge_on_the_gaussian_ode(name):
    """Data ~ N(0, 1): D(x, sigma) = x / (1 + sigma^2); the ODE solution is x_T * sqrt(1 + s^2) / sqrt(1 + s_T^2)."""
    def error(steps):
        plan = samplers.plan(name, steps, {**SD15, "set_alpha_to_one": True, "timestep_spacing": "trailing"})
        x = np.linspace(-2, 2, 9) * plan.sigmas[0]
        exact = x * math.sqrt(1 + plan.sigmas[-1] ** 2) / math.sqrt(1 + plan.sigmas[0] ** 2)
        return np.abs(plan.run(lambda x, sigma: x / (1 + sigma**2), x) - exact).max() / np.abs(exact).max()
    coarse, fine = error(25), error(100)
    assert fine < 0.02 and fine < 0.6 * coarse


def test_alphas_cumprod_matches_diffusers():
    for beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        config = {**SD15, "beta_schedule": beta_schedule}
        ref = diffusers.DDIMScheduler.from_config(config).alphas_cumprod.double().numpy()
        np.testing.assert_allclose(schedules.alphas_cumprod(config), ref, rtol=2e-5)


def test_karras_sigmas_are_monotone_and_end_in_zero():
    sigmas = schedules.karras_sigmas(10, 0.03, 14.6)
    assert len(sigmas) == 11 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-2] == pytest.approx(0.03)
    assert np.all(np.diff(sigmas) < 0)


def test_spacing_and_sigma_to_t():
    assert schedules.spaced_timesteps(10, "leading", steps_offset=1).tolist() == list(range(901, 0, -100))
    assert schedules.spaced_timesteps(4, "trailing").tolist() == [999, 749, 499, 249]
    assert schedules.spaced_timesteps(4, "linspace", round_linspace=True).tolist() == [999, 666, 333, 0]
    ac = schedules.alphas_cumprod(SD15)
    log_sigmas = np.log(schedules.training_sigmas(ac))
    for t in (0, 1, 261.5, 500, 998.25, 999):
        assert schedules.sigma_to_t(float(schedules.t_to_sigma(t, ac)), log_sigmas) == pytest.approx(t, abs=1e-3)
    assert isinstance(schedules.sigma_to_t(1.0, log_sigmas), float)
    assert schedules.sigma_to_t(schedules.Sigma(1.0, 123.0), log_sigmas) == 123.0


def test_names_and_labels():
    for name in samplers.SAMPLER_NAMES:
        assert samplers.plan(name, 4, SD15).label == name
    assert samplers.plan("DPM++ 2M", 4, SD15, scheduler="karras").label == "DPM++ 2M Karras"
    assert samplers.plan("dpm++ 2m karras", 4, SD15, scheduler="Automatic").label == "DPM++ 2M Karras"
    assert samplers.plan("k_euler_a", 4, SD15).label == "Euler a"
    assert set(samplers.DIFFUSERS_EQUIVALENT) == set(samplers.SAMPLER_NAMES)


def test_bad_requests_raise_invalid_request():
    with pytest.raises(InvalidRequest, match="DPM\\+\\+ 2M Karras"):
        samplers.plan("Euler b", 10, SD15)
    with pytest.raises(InvalidRequest, match="automatic, karras"):
        samplers.plan("Euler", 10, SD15, scheduler="exponential")
    with pytest.raises(InvalidRequest, match="no Karras schedule"):
        samplers.plan("DDIM", 10, SD15, scheduler="karras")
    with pytest.raises(InvalidRequest, match="steps"):
        samplers.plan("Euler", 0, SD15)
    with pytest.raises(InvalidRequest, match="original_inference_steps"):
        samplers.plan("LCM", 51, SD15)
    with pytest.raises(InvalidRequest, match="strength"):
        samplers.plan("Euler", 10, SD15, strength=1.5)


def test_strength_leaving_no_step_raises():
    with pytest.raises(InvalidRequest, match="raise strength to at least 0.1"):
        samplers.plan("Euler", 10, SD15, strength=0.05)
    assert len(samplers.plan("Euler", 10, SD15, strength=0.1).sigmas) == 2


def test_class_defaults_match_diffusers():
    for cls, defaults in samplers.CLASS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, cls).__init__).parameters
        assert {k: params[k].default for k in defaults} == defaults, cls


def test_init_sigma_semantics():
    euler = samplers.plan("Euler", 10, CONFIGS["leading"])
    assert euler.init_sigma == pytest.approx(math.sqrt(euler.sigmas[0] ** 2 + 1))
    linspace = samplers.plan("Euler", 10, CONFIGS["linspace"])
    assert linspace.init_sigma == linspace.sigmas[0]
    ddim = samplers.plan("DDIM", 10, SD15)
    assert ddim.init_sigma == pytest.approx(math.sqrt(1 + ddim.sigmas[0] ** 2))
    assert ddim.sigmas[-1] == pytest.approx(schedules.training_sigmas(schedules.alphas_cumprod(SD15))[0])


@pytest.mark.parametrize("name", [n for n in samplers.DIFFUSERS_EQUIVALENT
                                  if not n.endswith(samplers.KARRAS) and n not in samplers.NO_TRAILING])
@pytest.mark.parametrize("steps", [1, 4])
def test_sgm_uniform_is_trailing_spacing(name, steps):
    """A1111's SGM Uniform runs as diffusers' timestep_spacing="trailing" (LCM: those as custom timesteps)."""
    if name.startswith("LMS"):
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).double().numpy()
    cls, kwargs = samplers.DIFFUSERS_EQUIVALENT[name]
    scheduler = getattr(diffusers, cls).from_config({**SD15, "timestep_spacing": "trailing"}, **kwargs)
    if name == "LCM":
        scheduler.set_timesteps(timesteps=schedules.spaced_timesteps(steps, "trailing").astype(int).tolist())
    else:
        scheduler.set_timesteps(steps)
    ref_gen, sdrt_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    latents = torch.from_numpy(noise).float() * scheduler.init_noise_sigma
    step_kwargs = {"generator": ref_gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        out = fake_unet(scheduler.scale_model_input(latents, t).double().numpy(), float(t))
        latents = scheduler.step(torch.from_numpy(out).float(), t, latents, **step_kwargs).prev_sample
    ref = latents.double().numpy()

    plan = samplers.plan(name, steps, SD15, scheduler="SGM Uniform")
    fresh = lambda: torch.randn(SHAPE, generator=sdrt_gen, dtype=torch.float32).double().numpy()  # noqa: E731
    got = plan.run(fake_denoiser(SD15), noise * plan.init_sigma, noise=fresh) / math.sqrt(1 + plan.sigmas[-1] ** 2)
    assert np.abs(got - ref).max() <= RTOL * max(1.0, np.abs(ref).max())
    assert plan.calls[0][1] == 999 and plan.label == name
