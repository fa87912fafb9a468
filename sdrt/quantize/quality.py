"""How far a quantized build strays from fp32: the report every int8 build stores in its ``build.json``.

Both pipelines generate the same fixed-seed images; the report holds the cosine similarity of the final
latents and the PSNR of the decoded images, and :func:`judge` logs a WARNING when they fall below the build's
thresholds (the build is kept: nothing is refused silently, nothing is thrown away either). NumPy only.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from .calibration import CalibrationOptions, Recorder

log = logging.getLogger(__name__)

REPORT_PROMPTS = ("a photograph of a lighthouse on a cliff at sunset", "a bowl of fruit on a table, oil painting")
REPORT_SEED = 1


def quality_report(reference, candidate, calib: CalibrationOptions, prompts=REPORT_PROMPTS) -> dict:
    """int8 vs fp32 on fixed seeds: cosine similarity of the final latents and PSNR (dB) of the images.

    ``latent_cosine`` and ``psnr_db`` are the worst over the images; identical images count as 100 dB.
    """
    kw = dict(width=calib.width, height=calib.height, steps=calib.steps, sampler=calib.sampler,
              guidance_scale=calib.guidance_scale, batch_size=calib.batch_size)
    cosines, psnrs = [], []
    for i, prompt in enumerate(prompts):
        (ref, ref_latents), (ours, latents) = (_generate(p, prompt, REPORT_SEED + i, kw) for p in (reference, candidate))
        for a, b in zip(ref_latents, latents):
            cosines.append(float(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
        for a, b in zip(ref.images, ours.images):
            mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
            psnr = 100.0 if mse == 0 else min(100.0, 10 * math.log10(255.0 ** 2 / mse))
            psnrs.append(psnr)
    return {"latent_cosine": min(cosines), "psnr_db": min(psnrs), "images": len(psnrs),
            "latent_cosines": cosines, "psnrs_db": psnrs, "prompts": list(prompts), "seed": REPORT_SEED,
            "size": f"{calib.width}x{calib.height}", "steps": calib.steps, "sampler": calib.sampler}


def _generate(pipe, prompt: str, seed: int, kw: dict):
    """txt2img, plus the latents the VAE decoder was fed (one array per image)."""
    recorder, decoder = Recorder(pipe.models.vae_decoder), pipe.models.vae_decoder
    pipe.models.vae_decoder = recorder
    try:
        result = pipe.txt2img(prompt, seed=seed, **kw)
    finally:
        pipe.models.vae_decoder = decoder
    return result, [f["latent_sample"].ravel().astype(np.float64) for f in recorder.feeds]


def describe(report: dict) -> str:
    return (f"int8 vs fp32 on {report['images']} images ({report['size']}, {report['steps']} steps, "
            f"{report['sampler']}): latent cosine {report['latent_cosine']:.4f}, PSNR {report['psnr_db']:.1f} dB")


def warning(report: dict, min_cosine: float, min_psnr: float) -> str | None:
    """A warning line when the int8 build strays from fp32 more than the thresholds allow, else None."""
    if report["latent_cosine"] >= min_cosine and report["psnr_db"] >= min_psnr:
        return None
    return (f"this int8 build is below the quality thresholds (latent cosine {report['latent_cosine']:.4f}, "
            f"min {min_cosine}; PSNR {report['psnr_db']:.1f} dB, min {min_psnr}); it was built anyway. "
            "Try more --calibration-size/--calibration-steps, or use the fp32 build")


def judge(backend: str, report: dict, min_cosine: float, min_psnr: float) -> None:
    """Log the report (INFO) and, below the thresholds, the warning line (WARNING)."""
    log.info("%s: %s", backend, describe(report))
    problem = warning(report, min_cosine, min_psnr)
    if problem:
        log.warning("%s", problem)
