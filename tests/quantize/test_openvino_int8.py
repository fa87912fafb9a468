"""int8 OpenVINO builds: calibration capture, the NNCF-quantized IR, loading it, its quality report, cache keys."""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pytest

import sdrt
from sdrt import manifest as mf
from sdrt.cli import main
from sdrt.runtimes import BuildOptions, builds

pytest.importorskip("openvino")
pytest.importorskip("nncf")
import openvino as ov  # noqa: E402

from sdrt.quantize import openvino as quantize  # noqa: E402
from sdrt.quantize import quality  # noqa: E402
from sdrt.quantize.calibration import CalibrationOptions, capture_unet_inputs, read_prompts  # noqa: E402
from sdrt.runtimes.openvino import CACHE  # noqa: E402

INT8 = ["--precision", "int8", "--calibration-size", "2", "--calibration-steps", "3",
        "--calibration-resolution", "64x64"]


@pytest.fixture(scope="module")
def int8_build(tiny_export, tmp_path_factory):
    """A copy of the tiny export with an int8 build (2 prompts x 3 steps at 64x64), made through the CLI."""
    folder = tmp_path_factory.mktemp("ov_int8") / "export"
    shutil.copytree(tiny_export, folder, ignore=shutil.ignore_patterns("cache"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["build", str(folder), "--backend", "openvino", *INT8]) == 0
    entry = next(p for p in (folder / CACHE).iterdir() if len(p.name) == 16)
    return folder, entry, out.getvalue()


def test_calibration_captures_unet_inputs_over_the_timesteps(tiny_export):
    pipe = sdrt.load(tiny_export, runtime="openvino", progress=False)
    feeds = capture_unet_inputs(pipe, CalibrationOptions(prompts=2, steps=3, width=64, height=64,
                                                         sampler="Euler"), progress=False)
    assert len(feeds) == 2 * 3 * 1                      # prompts x steps x UNet calls per Euler step
    assert all(f["sample"].shape == (2, 4, 8, 8) and f["encoder_hidden_states"].shape[0] == 2 for f in feeds)
    timesteps = [float(f["timestep"][0]) for f in feeds]
    assert timesteps[:3] == timesteps[3:] and len(set(timesteps[:3])) == 3 and timesteps[0] > timesteps[2]
    assert not np.array_equal(feeds[0]["encoder_hidden_states"], feeds[3]["encoder_hidden_states"])
    assert pipe.models.unet.__class__.__name__ == "Timed"            # the recorder is removed afterwards
    assert len(read_prompts()) >= 32


def test_unet_is_int8_in_the_ir(int8_build):
    _, entry, _ = int8_build
    core = ov.Core()

    def census(name):
        ops = list(core.read_model(str(entry / f"{name}.xml")).get_ops())
        consts = {str(op.get_element_type()) for op in ops if op.get_type_name() == "Constant"}
        return sum(op.get_type_name() == "FakeQuantize" for op in ops), consts
    fq, consts = census("unet")
    assert fq > 0 and "<Type: 'int8_t'>" in consts          # activations and conv weights int8 (measured: 72 FQ)
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):   # weight-only: u8 weights, no FakeQuantize
        fq, consts = census(name)
        assert fq == 0 and "<Type: 'uint8_t'>" in consts


def test_int8_build_loads_and_generates(int8_build):
    folder, entry, _ = int8_build
    pipe = sdrt.load(folder, runtime="openvino", precision="int8", progress=False)
    assert pipe.models.unet.inner.path == entry / "unet.xml"
    result = pipe.txt2img("a red fox", width=64, height=64, steps=3, seed=5)
    assert result.images[0].size == (64, 64)
    default = sdrt.load(folder, runtime="openvino", progress=False)          # the only build: int8
    assert default.models.unet.inner.path == entry / "unet.xml"
    fp32 = sdrt.build(folder, BuildOptions(), progress=False)
    sdrt.build(folder, BuildOptions(precision="int8", calibration_size=2, calibration_steps=3,
                                    calibration_resolution=(64, 64)), progress=False)    # reused, now the newest
    default = sdrt.load(folder, runtime="openvino", progress=False)          # fp32 once it is built
    assert default.models.unet.inner.path == fp32 / "unet.xml"


def test_quality_report(int8_build):
    folder, entry, stdout = int8_build
    record = json.loads((entry / "build.json").read_text())
    report = record["quality"]
    # measured here (OpenVINO 2026.4.1, NNCF 3.4.0, tiny random model, 2 images, 64x64, 3 steps Euler a):
    # latent cosine 0.996, PSNR 33.7 dB
    assert math.isfinite(report["latent_cosine"]) and report["latent_cosine"] > 0
    assert math.isfinite(report["psnr_db"]) and report["images"] == 2
    assert record["options"]["precision"] == "int8" and record["options"]["int8"]["size"] == 2
    assert {c["precision"] for c in record["components"].values()} == {"int8"}
    assert f"latent cosine {report['latent_cosine']:.4f}" in stdout


def test_warning_when_below_thresholds(int8_build, caplog):
    folder, entry, _ = int8_build
    with caplog.at_level("WARNING"):            # the same build, reused, judged by stricter thresholds
        assert main(["build", str(folder), "--backend", "openvino", *INT8, "--min-cosine", "1.01"]) == 0
    assert "below the quality thresholds" in caplog.text and "latent cosine" in caplog.text
    assert (entry / "build.json").is_file()


def test_report_of_identical_pipelines(tiny_export):
    pipe = sdrt.load(tiny_export, runtime="openvino", progress=False)
    report = quality.quality_report(pipe, pipe, CalibrationOptions(steps=2, width=64, height=64))
    assert report["latent_cosine"] == pytest.approx(1.0) and report["psnr_db"] == 100.0
    assert quality.warning(report, 0.95, 20.0) is None
    assert "0.5" in quality.warning({**report, "latent_cosine": 0.5}, 0.95, 20.0)


def test_cache_key_follows_the_calibration(tiny_export, tmp_path):
    manifest = mf.read(tiny_export)
    base = BuildOptions(precision="int8", calibration_size=2, calibration_steps=3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# mine\na cat\na dog\n")
    variants = [base, BuildOptions(precision="int8", calibration_size=3, calibration_steps=3),
                BuildOptions(precision="int8", calibration_size=2, calibration_steps=4),
                BuildOptions(precision="int8", calibration_size=2, calibration_steps=3, calibration_prompts=prompts),
                BuildOptions(precision="int8", calibration_size=2, calibration_steps=3,
                             calibration_resolution=(96, 64))]
    keys = {builds.entry_key({}, quantize.settings(manifest, o), "v") for o in variants}
    assert len(keys) == len(variants)
    assert quantize.settings(manifest, base) == quantize.settings(manifest, BuildOptions(**base.__dict__))
    static = quantize.calibration_options(manifest, BuildOptions(precision="int8", static=(64, 96), batch=2))
    assert (static.width, static.height, static.batch_size) == (64, 96, 2)
