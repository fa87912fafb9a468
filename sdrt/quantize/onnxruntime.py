"""int8 ONNX Runtime builds: the UNet quantized statically to QDQ with ``onnxruntime.quantization``.

Quantized, weights (int8, per output channel) and activations (uint8): every Conv, Gemm and MatMul with a
constant weight (the linear layers), calibrated (min/max) on UNet inputs captured from sdrt's own sampling
loop (:mod:`.calibration`). ONNX Runtime's CPU provider fuses each DequantizeLinear -> Conv/MatMul ->
QuantizeLinear into one int8 kernel. Kept fp32 (:func:`kept_fp32`): attention's activation-by-activation
MatMuls (softmax probabilities over thousands of tokens are far below uint8's resolution), the convolutions
whose inputs mix ranges (``conv_in`` on the latents, ``conv_out`` making the prediction, the 1x1
``conv_shortcut`` over concatenated skip connections; on the tiny test model they alone take the latent
cosine from 0.994 to 0.977), normalization and the rest.
Weights use 7 bits (``reduce_range``): x86 CPUs without VNNI saturate 16-bit sums of u8·s8 products
otherwise, and the build must run on any of them. Text encoder and VAE stay fp32 (they are a small share of
the time; the VAE decoder is where quantization errors show as artifacts).

Every build is judged against fp32 on fixed seeds (:func:`.quality.quality_report`) like the OpenVINO one.

    sdrt build OUT --backend onnxruntime --precision int8 [--calibration-size 32 --calibration-steps 10]
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np

from .. import manifest as mf
from ..errors import InvalidRequest, ModelFolderError
from .calibration import calibration_options, calibration_settings, capture_unet_inputs
from .quality import quality_report

log = logging.getLogger(__name__)

SCHEME = "qdq-v1"               # bump when the recipe below changes: it is part of the build cache key
# TensorRT's explicit quantization takes symmetric int8 only (zero point 0, activations and weights, 8 bits)
SYMMETRIC_SCHEME = "qdq-symmetric-v1"   # and float biases
OP_TYPES = ["Conv", "Gemm", "MatMul"]
KEPT_CONVS = ("conv_in", "conv_out", "conv_shortcut")      # diffusers module names


def settings(manifest: mf.Manifest, options, symmetric: bool = False) -> dict:
    """What makes an int8 build differ from another one: the recipe and the calibration."""
    return {"scheme": SYMMETRIC_SCHEME if symmetric else SCHEME,
            **calibration_settings(calibration_options(manifest, options))}


class FeedReader:
    """The captured feed dicts as an ``onnxruntime.quantization.CalibrationDataReader``."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def kept_fp32(graph) -> list[str]:
    """Names of the UNet nodes of ``OP_TYPES`` left fp32: MatMuls without a constant operand, and the
    ``KEPT_CONVS`` (the TorchScript exporter names a node ``/unet/<module path>/<op>``)."""
    constants = {t.name for t in graph.initializer}
    return [n.name for n in graph.node
            if (n.op_type == "MatMul" and not constants.intersection(n.input))
            or (n.op_type == "Conv" and PurePosixPath(n.name).parent.name in KEPT_CONVS)]


def quantize_unet(source: Path, target: Path, calibration: list[dict[str, np.ndarray]], symmetric: bool = False
                  ) -> None:
    """Write the QDQ int8 UNet of ``source`` (fp32 ONNX) to ``target``, calibrated on ``calibration``.

    ``symmetric`` (for TensorRT): int8 activations and weights with zero point 0 and all 8 bits, the only
    form TensorRT's explicit quantization accepts, biases left float (no int32 DequantizeLinear); otherwise the
    CPU recipe (uint8 activations, 7-bit weights, int32 biases).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    graph = onnx.load(str(source), load_external_data=False).graph
    hint = NoPreprocessingHint()
    logging.getLogger().addFilter(hint)
    try:
        _readable(source)
        quantize_static(str(source), str(target), FeedReader(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=OP_TYPES, nodes_to_exclude=kept_fp32(graph), per_channel=True,
                        reduce_range=not symmetric,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
                        if symmetric else None,
                        use_external_data_format=source.with_name(source.name + "_data").is_file())
    finally:
        logging.getLogger().removeFilter(hint)


def _readable(source: Path) -> None:
    """onnx refuses external data with several hard links ("potential hardlink attack"); say so plainly."""
    data = source.with_name(source.name + "_data")
    if data.is_file() and data.stat().st_nlink > 1:
        raise ModelFolderError(f"{data} has {data.stat().st_nlink} hard links, and onnx refuses to read such "
                               "external data; copy the export (cp -r) instead of hard-linking it")


class NoPreprocessingHint(logging.Filter):
    """Drops onnxruntime 1.32's root-logger WARNING "Please consider to run pre-processing before quantization":
    ``quant_pre_process`` changes nothing here (same QDQ nodes and quality on the tiny UNet), so on the
    command line it would only read as a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def quantize_build(folder: Path, manifest: mf.Manifest, tmp: Path, options, progress: bool = True,
                   symmetric: bool = False) -> tuple[dict, dict]:
    """Write the int8 UNet into ``tmp`` (a build being staged); its record components and quality report
    (measured on ONNX Runtime's CPU provider; ``symmetric``: the TensorRT recipe, see :func:`quantize_unet`)."""
    from .. import loader
    from ..runtimes import onnxruntime as backend
    if sorted({c.precision for c in manifest.components.values()}) != ["fp32"]:
        raise InvalidRequest("--precision int8 starts from an fp32 export; re-export without --fp16")
    calib = calibration_options(manifest, options)
    # the fp32 pipeline is not kept while quantizing: at full size the quantizer holds the UNet twice itself
    feeds = capture_unet_inputs(loader.assemble(folder, manifest, backend, manifest.components, progress=False),
                                calib, progress)
    log.info("int8: %d UNet calibration inputs (%d prompts x %d steps, %dx%d)", len(feeds), calib.prompts,
             calib.steps, calib.width, calib.height)
    unet = manifest.components["unet"]
    quantize_unet(folder / unet.file, tmp / "unet.onnx", feeds, symmetric)
    del feeds
    components = {"unet": {"spec": unet.spec, "file": "unet.onnx", "precision": "int8"}}
    candidate = {**manifest.components, "unet": replace(unet, file=str(tmp / "unet.onnx"), precision="int8")}
    reference, int8 = (loader.assemble(folder, manifest, backend, c, progress=False)
                       for c in (manifest.components, candidate))
    return components, quality_report(reference, int8, calib)
