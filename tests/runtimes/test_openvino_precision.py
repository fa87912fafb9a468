"""OpenVINO precisions: fp16-weight builds (``sdrt build --precision fp16``) and the inference precision
(``inference_precision=`` / ``--inference-precision``), read back from the compiled model."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import sdrt
from sdrt.benchmark import BenchOptions
from sdrt.cli import main
from sdrt.errors import InvalidRequest

ov = pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
from sdrt.runtimes.openvino import CACHE, MODEL_CACHE  # noqa: E402

KW = dict(width=64, height=64, steps=8, seed=3, sampler="Euler a", negative_prompt="blurry")
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def expected_compute(asked: str) -> set[str]:
    """What this CPU's OpenVINO plugin can compute in when asked for ``asked``: it falls back to what the CPU
    has (f16 to bf16 on AVX512-BF16/AMX CPUs without AVX512-FP16, else to f32)."""
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    has = {"f32"} | ({"bf16"} if "BF16" in caps else set()) | ({"f16"} if "FP16" in caps else set())
    if asked in has:
        return {asked}
    return has - {"f16"}                    # the CPU has no f16 (asked f16) or no bf16 (asked bf16: f32)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def fp16_build(tiny_export, tmp_path_factory):
    """A copy of the tiny export with an fp16-weight OpenVINO build, made through the CLI."""
    folder = tmp_path_factory.mktemp("ov_fp16") / "export"
    shutil.copytree(tiny_export, folder, ignore=shutil.ignore_patterns("cache"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["build", str(folder), "--backend", "openvino", "--precision", "fp16"]) == 0
    entry = next(p for p in (folder / CACHE).iterdir() if p.name != MODEL_CACHE)
    return folder, entry, out.getvalue()


@pytest.fixture(scope="module")
def fp32_image(tiny_export):
    return pixels(sdrt.load(tiny_export, runtime="onnxruntime", progress=False).txt2img("a cat", **KW))


def test_fp16_build_has_fp16_weights(fp16_build, tiny_export):
    _, entry, _ = fp16_build
    for name in COMPONENTS:
        types = [str(op.get_element_type()) for op in ov.Core().read_model(str(entry / f"{name}.xml")).get_ops()
                 if op.get_type_name() == "Constant"]
        assert types.count("<Type: 'float16'>") > types.count("<Type: 'float32'>"), name
        # measured: 0.50-0.51 of the fp32 ONNX file
        assert (entry / f"{name}.bin").stat().st_size < 0.6 * (tiny_export / f"{name}.onnx").stat().st_size


def test_fp16_build_matches_fp32(fp16_build, fp32_image):
    folder, entry, stdout = fp16_build
    pipe = sdrt.load(folder, runtime="openvino", precision="fp16", progress=False)
    assert pipe.models.unet.inner.path == entry / "unet.xml"
    diff = np.abs(pixels(pipe.txt2img("a cat", **KW)) - fp32_image)
    # measured here (OpenVINO 2026.4.1, tiny model, 64x64, 8 steps): mean 0.03/255, max 1/255
    assert diff.mean() < 0.5 and diff.max() <= 3, (diff.mean(), diff.max())
    record = json.loads((entry / "build.json").read_text())
    assert record["options"]["precision"] == "fp16"
    assert {c["precision"] for c in record["components"].values()} == {"fp16"}
    assert record["compiled"] == {"device": "CPU", "inference_precision": dict.fromkeys(COMPONENTS, "f32")}
    assert "compiled for CPU: computes in f32" in stdout


@pytest.mark.parametrize("asked", ["f32", "bf16", "f16"])
def test_inference_precision_is_read_back(tiny_export, asked):
    pipe = sdrt.load(tiny_export, runtime="openvino", inference_precision=asked, progress=False)
    computes = {getattr(pipe.models, c).inner.inference_precision for c in COMPONENTS}
    assert len(computes) == 1 and computes <= expected_compute(asked), (asked, computes)


def test_default_is_f32_on_cpu(tiny_export):
    pipe = sdrt.load(tiny_export, runtime="openvino", progress=False)
    assert pipe.models.unet.inner.inference_precision == "f32"


def test_bf16_stays_close_to_fp32(tiny_export, fp32_image):
    if "bf16" not in expected_compute("bf16"):
        pytest.skip("this CPU has no bf16: OpenVINO computes in f32 anyway")
    pipe = sdrt.load(tiny_export, runtime="openvino", inference_precision="bf16", progress=False)
    diff = np.abs(pixels(pipe.txt2img("a cat", **KW)) - fp32_image)
    # bf16 keeps 8 mantissa bits; measured here (AVX512-BF16): mean 0.8/255, max 5/255
    assert diff.mean() < 3 and diff.max() <= 24, (diff.mean(), diff.max())


def test_inference_precision_errors(tiny_export, tmp_path, capsys):
    with pytest.raises(InvalidRequest, match="OpenVINO computes in f32, bf16, f16"):
        sdrt.load(tiny_export, runtime="openvino", inference_precision="fp8")
    with pytest.raises(InvalidRequest, match=r"takes no \['inference_precision'\]"):
        sdrt.load(tiny_export, runtime="onnxruntime", inference_precision="bf16")
    with pytest.raises(InvalidRequest, match="--inference-precision fp16"):
        BenchOptions(inference_precision="fp16").check()
    png = tmp_path / "cat.png"
    args = ["generate", str(tiny_export), "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "1",
            "--output", str(png), "--inference-precision", "bf16"]
    assert main([*args, "--runtime", "onnxruntime"]) == 2
    assert "takes no ['inference_precision']" in capsys.readouterr().err
    assert main([*args, "--runtime", "openvino"]) == 0 and png.is_file()


def test_bench_reports_what_openvino_computes_in(tiny_export):
    spec = {"kind": "sdrt", "runtime": "openvino", "precision": "fp32", "folder": str(tiny_export), "width": 64,
            "height": 64, "steps": 1, "guidance": 7.5, "batch": 1, "runs": 1, "warmup": 0, "threads": 1,
            "seed": 1, "sampler": "Euler a", "prompt": "a cat", "inference_precision": "bf16"}
    out = subprocess.run([sys.executable, "-m", "sdrt.benchmark.worker", json.dumps(spec)], capture_output=True,
                         check=True, text=True).stdout
    result = json.loads(out)
    assert result["status"] == "ok" and result["precision"] in expected_compute("bf16")
