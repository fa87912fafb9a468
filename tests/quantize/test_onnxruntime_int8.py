"""int8 ONNX Runtime builds: the static QDQ UNet, its quality report, loading it by precision, the build cache."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import time

import numpy as np
import pytest

import sdrt
from sdrt import manifest as mf
from sdrt.benchmark import BenchOptions, _sdrt_jobs
from sdrt.cli import main
from sdrt.errors import InvalidRequest
from sdrt.runtimes import BuildOptions, builds

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from sdrt.quantize import onnxruntime as quantize  # noqa: E402
from sdrt.runtimes.onnxruntime import CACHE  # noqa: E402

INT8 = ["--backend", "onnxruntime", "--precision", "int8", "--calibration-size", "2", "--calibration-steps", "3",
        "--calibration-resolution", "64x64"]
OPTIONS = BuildOptions(backend="onnxruntime", precision="int8", calibration_size=2, calibration_steps=3,
                       calibration_resolution=(64, 64))
KW = dict(width=64, height=64, steps=3, seed=1, sampler="Euler a")


@pytest.fixture(scope="module")
def int8_build(tiny_export, tmp_path_factory):
    """A copy of the tiny export with an ONNX Runtime int8 build (2 prompts x 3 steps at 64x64), via the CLI."""
    folder = tmp_path_factory.mktemp("ort_int8") / "export"
    shutil.copytree(tiny_export, folder, ignore=shutil.ignore_patterns("cache"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["build", str(folder), *INT8]) == 0
    entry = next((folder / CACHE).iterdir())
    return folder, entry, out.getvalue()


def test_unet_is_qdq_int8(int8_build):
    folder, entry, _ = int8_build
    graph = onnx.load(str(entry / "unet.onnx")).graph
    producer = {out: node for node in graph.node for out in node.output}
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    kept = set(quantize.kept_fp32(onnx.load(str(folder / "unet.onnx")).graph))

    def quantized(node):            # both operands come through DequantizeLinear, the weight from int8
        sources = [producer.get(name) for name in node.input[:2]]
        return all(s is not None and s.op_type == "DequantizeLinear" for s in sources) and \
            sources[1].input[0] in int8
    nodes = [n for n in graph.node if n.op_type in quantize.OP_TYPES]
    assert {n.name for n in nodes if not quantized(n)} == kept
    assert any("conv_shortcut" in name for name in kept) and any("attn1/MatMul" in name for name in kept)
    assert sum(map(quantized, nodes)) > 60                  # measured: 112 of 145 (the tiny UNet)
    # the weights of a quantized conv are int8 per output channel
    conv = next(n for n in nodes if n.op_type == "Conv" and quantized(n))
    scale = next(t for t in graph.initializer if t.name == producer[conv.input[1]].input[1])
    assert len(scale.dims) == 1 and scale.dims[0] > 1


def test_quality_report(int8_build):
    _, entry, stdout = int8_build
    record = json.loads((entry / "build.json").read_text())
    report = record["quality"]
    # measured here (onnxruntime 1.32, tiny random model, 2 images, 64x64, 3 steps Euler a):
    # latent cosine 0.9936, PSNR 32.0 dB
    assert 0.95 < report["latent_cosine"] < 1.0 and 25.0 < report["psnr_db"] < 100.0
    assert report["images"] == 2 and f"latent cosine {report['latent_cosine']:.4f}" in stdout
    assert record["options"] == {"precision": "int8", "int8": quantize.settings(mf.read(entry.parents[2]), OPTIONS)}
    assert record["components"] == {"unet": {"spec": "unet", "file": "unet.onnx", "precision": "int8"}}
    assert set(record["files"]) == {"unet.onnx"}            # text encoder and VAE stay the exported fp32 files


def test_load_picks_the_build_by_precision(int8_build):
    folder, entry, _ = int8_build
    int8 = sdrt.load(folder, runtime="onnxruntime", precision="int8", progress=False)
    assert int8.models.unet.inner.path == entry / "unet.onnx"
    assert int8.models.vae_decoder.inner.path == folder / "vae_decoder.onnx"
    for fp32 in (sdrt.load(folder, runtime="onnxruntime", progress=False),
                 sdrt.load(folder, runtime="onnxruntime", precision="fp32", progress=False)):
        assert fp32.models.unet.inner.path == folder / "unet.onnx"
    a, b = (np.asarray(p.txt2img("a red fox", **KW).images[0], np.float64) for p in (int8, fp32))
    assert 20.0 < 10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2)) < 100.0      # close, but quantized
    jobs = [name for name, _, _ in _sdrt_jobs(folder, mf.read(folder), BenchOptions(runtimes=("onnxruntime",)))]
    assert jobs == ["sdrt onnxruntime fp32", "sdrt onnxruntime int8"]


def test_warning_when_below_thresholds(int8_build, caplog):
    folder, entry, _ = int8_build
    began = time.perf_counter()
    with caplog.at_level("WARNING"):            # the same build, reused, judged by stricter thresholds
        assert main(["build", str(folder), *INT8, "--min-psnr", "101"]) == 0
    assert time.perf_counter() - began < 3.0, "the build was redone, not reused"
    assert "below the quality thresholds" in caplog.text and "PSNR" in caplog.text
    assert (entry / "build.json").is_file()


def test_corrupted_entry_is_removed_and_rebuilt(int8_build, tmp_path):
    folder = shutil.copytree(int8_build[0], tmp_path / "export")
    entry = folder / int8_build[1].relative_to(int8_build[0])
    (entry / "build.json").unlink()                                         # as a build killed before its record
    with pytest.raises(InvalidRequest, match="has no int8 build"):           # never loads the broken entry
        sdrt.load(folder, runtime="onnxruntime", precision="int8", progress=False)
    assert not entry.exists()
    assert sdrt.build(folder, OPTIONS, progress=False) == entry
    assert sdrt.load(folder, runtime="onnxruntime", precision="int8", progress=False).models.unet.inner.path \
        == entry / "unet.onnx"
    model = entry / "unet.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])          # a truncated graph
    with pytest.raises(InvalidRequest, match="has no int8 build"):
        sdrt.load(folder, runtime="onnxruntime", precision="int8", progress=False)
    assert not entry.exists()


def test_build_option_errors(tiny_export):
    for options, message in ((BuildOptions(backend="onnxruntime"), "nothing to build"),
                             (BuildOptions(backend="onnxruntime", precision="fp16"), "at --precision fp16"),
                             (BuildOptions(backend="onnxruntime", precision="int8", static=(64, 64)), "--static"),
                             (BuildOptions(backend="onnxruntime", precision="int8", device="GPU"), "--device")):
        with pytest.raises(InvalidRequest, match=message):
            sdrt.build(tiny_export, options, progress=False)
    assert not (tiny_export / CACHE).exists(), "a refused build left files behind"


def test_cache_key_follows_the_recipe_and_calibration(tiny_export):
    manifest = mf.read(tiny_export)
    variants = [OPTIONS, BuildOptions(precision="int8", calibration_size=3, calibration_steps=3),
                BuildOptions(precision="int8", calibration_size=2, calibration_steps=4)]
    keys = {builds.entry_key({}, quantize.settings(manifest, o), "v") for o in variants}
    assert len(keys) == len(variants)
    assert quantize.settings(manifest, OPTIONS)["scheme"] == quantize.SCHEME


def test_hard_linked_external_data_is_a_clear_error(tmp_path):
    from sdrt.errors import ModelFolderError
    from sdrt.quantize.onnxruntime import _readable
    (tmp_path / "unet.onnx").write_bytes(b"")
    (tmp_path / "unet.onnx_data").write_bytes(b"weights")
    _readable(tmp_path / "unet.onnx")
    (tmp_path / "copy").hardlink_to(tmp_path / "unet.onnx_data")
    with pytest.raises(ModelFolderError, match="2 hard links"):
        _readable(tmp_path / "unet.onnx")
