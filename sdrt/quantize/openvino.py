"""int8 OpenVINO builds with NNCF, the way optimum-intel quantizes diffusion models ("hybrid" mode).

UNet: the weights of every MatMul (attention projections, feed-forward, time/text projections) become int8
weight-only, and the Convolutions (and the activation-by-activation MatMuls of attention) are quantized
weights AND activations to int8 with ``nncf.quantize``, calibrated on UNet inputs captured from sdrt's own
sampling loop (:mod:`.calibration`). SmoothQuant is off for MatMuls, whose weights are already compressed.
Text encoder and VAE: int8 weight-only (``nncf.compress_weights``, INT8_ASYM); their activations stay fp32.

Every build is then judged against the fp32 graphs on fixed seeds (:func:`.quality.quality_report`); the numbers go
into the build's ``build.json`` and a warning is logged when they fall below the build's thresholds.

    sdrt build OUT --backend openvino --precision int8 [--calibration-size 32 --calibration-steps 10]
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import manifest as mf
from ..errors import BackendUnavailable, InvalidRequest
from .calibration import calibration_options, calibration_settings, capture_unet_inputs
from .quality import quality_report

log = logging.getLogger(__name__)

SCHEME = "hybrid-v1"            # bump when the recipe below changes: it is part of the build cache key


def _nncf():
    try:
        import nncf
    except ImportError:
        raise BackendUnavailable("int8 builds need NNCF; `pip install sdrt[quantize]`") from None
    if not log.isEnabledFor(logging.INFO):          # NNCF logs every skipped quantizer at INFO; -v shows them
        nncf.set_log_level(logging.WARNING)
    return nncf


def settings(manifest: mf.Manifest, options) -> dict:
    """What makes an int8 build differ from another one: the recipe, NNCF's version and the calibration."""
    return {"scheme": SCHEME, "nncf": _nncf().__version__,
            **calibration_settings(calibration_options(manifest, options))}


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
