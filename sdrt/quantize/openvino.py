"""int8 OpenVINO builds with NNCF, the way optimum-intel quantizes diffusion models ("hybrid" mode).

UNet: the weights of every MatMul (attention projections, feed-forward, time/text projections) become int8
weight-only, and the Convolutions (and the activation-by-activation MatMuls of attention) are quantized
weights AND activations to int8 with ``nncf.quantize``, calibrated on UNet inputs captured from sdrt's own
sampling loop (:mod:`.calibration`). SmoothQuant is off for MatMuls, whose weights are already compressed.
Text encoder and VAE: int8 weight-only (``nncf.compress_weights``, INT8_ASYM); their activations stay fp32.

Every build is then judged against the fp32 graphs on fixed seeds (:func:`quality_report`); the numbers go
into the build's ``build.json`` and a warning is logged when they fall below the build's thresholds.

    sdrt build OUT --backend openvino --precision int8 [--calibration-size 32 --calibration-steps 10]
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import manifest as mf
from ..errors import BackendUnavailable, InvalidRequest
from ..specs import VAE_FACTOR
from .calibration import CalibrationOptions, Recorder, capture_unet_inputs, prompts_digest

log = logging.getLogger(__name__)

SCHEME = "hybrid-v1"            # bump when the recipe below changes: it is part of the build cache key
REPORT_PROMPTS = ("a photograph of a lighthouse on a cliff at sunset", "a bowl of fruit on a table, oil painting")
REPORT_SEED = 1


def _nncf():
    try:
        import nncf
    except ImportError:
        raise BackendUnavailable("int8 builds need NNCF; `pip install sdrt[quantize]`") from None
    if not log.isEnabledFor(logging.INFO):          # NNCF logs every skipped quantizer at INFO; -v shows them
        nncf.set_log_level(logging.WARNING)
    return nncf


def calibration_options(manifest: mf.Manifest, options) -> CalibrationOptions:
    """The calibration a build's options ask for; the image size is the static one, else the model's native."""
    arch = manifest.architecture
    native = arch.get("sample_size", 64) * arch.get("vae_factor", VAE_FACTOR)
    width, height = options.static or options.calibration_resolution or (native, native)
    given = {"prompt_file": options.calibration_prompts, "prompts": options.calibration_size,
             "steps": options.calibration_steps}
    return replace(CalibrationOptions(width=width, height=height, batch_size=(options.batch or 1)),
                   **{k: v for k, v in given.items() if v is not None})


def settings(manifest: mf.Manifest, options) -> dict:
    """What makes an int8 build differ from another one: the recipe, NNCF's version and the calibration."""
    c = calibration_options(manifest, options)
    c.check()
    return {"scheme": SCHEME, "nncf": _nncf().__version__, "prompts": prompts_digest(c.prompt_file),
            "size": c.prompts, "steps": c.steps, "sampler": c.sampler, "resolution": [c.width, c.height],
            "seed": c.seed}


def weighted_matmuls(model) -> list[str]:
    """Names of the MatMuls with a constant operand (through a Convert), i.e. the linear layers."""
    def constant(value):
        node = value.get_node()
        while node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"
    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "MatMul" and any(constant(v) for v in op.input_values())]


def quantize_unet(model, calibration: list[dict[str, np.ndarray]]):
    """Hybrid int8 UNet: MatMul weights int8 weight-only, Convolutions (and attention's activation MatMuls)
    weights and activations int8, calibrated on ``calibration`` (feed dicts as the pipeline sends them)."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    linear = weighted_matmuls(model)
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                  ignored_scope=nncf.IgnoredScope(types=["Convolution"], validate=False))
    dtypes = {port.get_any_name(): port.get_element_type().to_dtype() for port in model.inputs}
    dataset = nncf.Dataset(calibration, lambda feeds: {k: np.asarray(v, dtypes.get(k)) for k, v in feeds.items()})
    return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                         ignored_scope=nncf.IgnoredScope(names=linear, validate=False),
                         advanced_parameters=AdvancedQuantizationParameters(
                             smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))


def compress_weights(model):
    """int8 weight-only (asymmetric, per output channel): the text encoder and the VAE."""
    nncf = _nncf()
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def quantize_build(folder: Path, manifest: mf.Manifest, tmp: Path, options, progress: bool = True) -> dict:
    """Turn the fp32 IR files in ``tmp`` (a build being staged) into int8, and return its quality report."""
    import openvino as ov

    from .. import loader
    from ..runtimes import openvino as backend
    if sorted({c.precision for c in manifest.components.values()}) != ["fp32"]:
        raise InvalidRequest("--precision int8 starts from an fp32 export; re-export without --fp16")
    calib = calibration_options(manifest, options)
    reference = loader.assemble(folder, manifest, backend, manifest.components, progress=False)   # the ONNX, fp32
    feeds = capture_unet_inputs(reference, calib, progress)
    log.info("int8: %d UNet calibration inputs (%d prompts x %d steps, %dx%d)", len(feeds), calib.prompts,
             calib.steps, calib.width, calib.height)
    core = ov.Core()
    for name in manifest.components:
        xml = tmp / f"{name}.xml"
        model = core.read_model(str(xml))
        model = quantize_unet(model, feeds) if name == "unet" else compress_weights(model)
        ov.save_model(model, str(tmp / f"{name}.int8.xml"), compress_to_fp16=False)
        del model
        for ext in ("xml", "bin"):
            os.replace(tmp / f"{name}.int8.{ext}", tmp / f"{name}.{ext}")
    candidate = {n: replace(c, file=str(tmp / f"{n}.xml"), precision="int8")
                 for n, c in manifest.components.items()}
    int8 = loader.assemble(folder, manifest, backend, candidate, progress=False)
    return quality_report(reference, int8, calib)


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
