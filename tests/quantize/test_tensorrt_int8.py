"""The int8 recipe of TensorRT builds: a symmetric QDQ UNet (int8 activations and weights, zero point 0), the
only form TensorRT's explicit quantization takes, made and judged here on ONNX Runtime's CPU provider. The
TensorRT engine built from it needs a GPU and is not tested here."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from sdrt import manifest as mf
from sdrt.runtimes import BuildOptions

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from sdrt.quantize import onnxruntime as quantize  # noqa: E402

OPTIONS = BuildOptions(backend="tensorrt", precision="int8", calibration_size=2, calibration_steps=3,
                       calibration_resolution=(64, 64))


@pytest.fixture(scope="module")
def symmetric(tiny_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt_int8") / "export"
    shutil.copytree(tiny_export, folder, ignore=shutil.ignore_patterns("cache"))
    tmp = folder / "staged"
    tmp.mkdir()
    components, quality = quantize.quantize_build(folder, mf.read(folder), tmp, OPTIONS, progress=False,
                                                  symmetric=True)
    return folder, tmp / "unet.onnx", components, quality


def test_every_quantizer_is_symmetric_int8(symmetric):
    _, path, components, _ = symmetric
    graph = onnx.load(str(path)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(nodes) > 100
    for node in nodes:
        zero_point = values[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
    assert not any(v.dtype in (np.uint8, np.int32) for v in values.values())   # no uint8 activations, int32 biases
    assert components == {"unet": {"spec": "unet", "file": "unet.onnx", "precision": "int8"}}


def test_symmetric_quality_against_fp32(symmetric):
    *_, quality = symmetric
    # measured here (onnxruntime 1.32, tiny random model, 2 images, 64x64, 3 steps Euler a, ONNX Runtime CPU):
    # latent cosine 0.991, PSNR 30.1 dB
    assert 0.95 < quality["latent_cosine"] < 1.0 and quality["psnr_db"] > 25.0


def test_the_recipe_is_part_of_the_key(tiny_export):
    manifest = mf.read(tiny_export)
    assert quantize.settings(manifest, OPTIONS, symmetric=True)["scheme"] == quantize.SYMMETRIC_SCHEME
    assert quantize.settings(manifest, OPTIONS)["scheme"] == quantize.SCHEME != quantize.SYMMETRIC_SCHEME
