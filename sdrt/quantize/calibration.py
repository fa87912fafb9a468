"""Calibration data for int8: the UNet inputs sdrt's own pipeline feeds it, prompt by prompt, step by step.

Activation ranges in a diffusion UNet depend on the timestep (and on the guidance batch), so calibration runs
the real sampling loop over a prompt set and records every UNet call, rather than feeding random tensors.
NumPy only: the pipeline may run on any runtime.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import manifest as mf
from ..errors import InvalidRequest
from ..pipelines.pipeline import StableDiffusion
from ..runtimes.base import Runtime
from ..specs import VAE_FACTOR


@dataclass(frozen=True)
class CalibrationOptions:
    """How the calibration set is made: ``prompts`` prompts x ``steps`` sampler steps at width x height."""
    prompts: int = 32                       # how many prompts of the prompt file (the file's first ones)
    steps: int = 10
    sampler: str = "Euler a"
    width: int = 512
    height: int = 512
    batch_size: int = 1                     # images per call (a static build's --batch)
    guidance_scale: float = 7.5
    seed: int = 0                           # prompt i uses seed + i
    prompt_file: Path | None = None         # None: sdrt/quantize/prompts.txt

    def check(self) -> None:
        if self.prompts < 1 or self.steps < 1:
            raise InvalidRequest(f"--calibration-size and --calibration-steps must be >= 1, "
                                 f"not {self.prompts} and {self.steps}")


def calibration_options(manifest: mf.Manifest, options) -> CalibrationOptions:
    """The calibration a build's options (``BuildOptions``) ask for; the image size is the static one, else
    ``--calibration-resolution``, else the model's native size; a ``--no-cfg`` build calibrates at guidance_scale
    0 (one UNet row per image, as it runs)."""
    arch = manifest.architecture
    native = arch.get("sample_size", 64) * arch.get("vae_factor", VAE_FACTOR)
    width, height = options.static or options.calibration_resolution or (native, native)
    given = {"prompt_file": options.calibration_prompts, "prompts": options.calibration_size,
             "steps": options.calibration_steps}
    if not options.cfg and not arch.get("time_cond_proj_dim"):      # an LCM UNet takes its guidance as an input
        given["guidance_scale"] = 0.0
    return replace(CalibrationOptions(width=width, height=height, batch_size=(options.batch or 1)),
                   **{k: v for k, v in given.items() if v is not None})


def calibration_settings(calib: CalibrationOptions) -> dict:
    """What makes one calibration differ from another, for build cache keys (the prompts by their digest)."""
    calib.check()
    return {"prompts": prompts_digest(calib.prompt_file), "size": calib.prompts, "steps": calib.steps,
            "sampler": calib.sampler, "resolution": [calib.width, calib.height], "seed": calib.seed}


class Recorder:
    """A Runtime that keeps a copy of every ``feeds`` it is run with, then runs the wrapped one."""

    def __init__(self, inner: Runtime):
        self.inner, self.spec = inner, inner.spec
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.inner.run(feeds)


def read_prompts(path: Path | None = None) -> list[str]:
    """Non-empty, non-comment lines of ``path`` (default: the prompt set shipped with sdrt)."""
    try:
        text = Path(path).read_text() if path else resources.files(__package__).joinpath("prompts.txt").read_text()
    except OSError as e:
        raise InvalidRequest(f"--calibration-prompts {path}: cannot read it ({e.strerror})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidRequest(f"--calibration-prompts {path}: no prompts in it (one per line, # for comments)")
    return prompts


def prompts_digest(path: Path | None = None) -> str:
    """sha256 of the prompt list, for build cache keys."""
    return hashlib.sha256("\n".join(read_prompts(path)).encode()).hexdigest()[:16]


def capture_unet_inputs(pipe: StableDiffusion, options: CalibrationOptions = CalibrationOptions(),
                        progress: bool = True) -> list[dict[str, np.ndarray]]:
    """Run txt2img over the calibration prompts and return every UNet feed dict, in call order.

    There are prompts x steps x (UNet calls per step: 1, or 2 for Heun/DPM2) feed dicts, each holding the
    guidance batch [uncond; cond] as the pipeline sends it. Uses ``pipe`` as loaded (run it at fp32).
    """
    from tqdm.auto import tqdm
    options.check()
    prompts = read_prompts(options.prompt_file)
    prompts = (prompts * -(-options.prompts // len(prompts)))[:options.prompts]     # repeat a short file
    recorder, unet = Recorder(pipe.models.unet), pipe.models.unet
    pipe.models.unet = recorder
    try:
        for i, prompt in enumerate(tqdm(prompts, desc="int8: calibrating", unit="prompt",
                                        disable=None if progress else True, leave=False)):
            pipe.txt2img(prompt, width=options.width, height=options.height, steps=options.steps,
                         sampler=options.sampler, guidance_scale=options.guidance_scale, seed=options.seed + i,
                         batch_size=options.batch_size)
    finally:
        pipe.models.unet = unet
    return recorder.feeds
