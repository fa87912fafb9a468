"""ONNX Runtime on a GPU, as far as a CPU machine can test it: runtime="auto" falling through providers that are
listed but fail (fake providers: a stand-in InferenceSession that raises or falls back, as ONNX Runtime does
when CUDA libraries are missing; only the selection logic is under test there), IO binding (real, on the CPU
provider), the TensorRT EP's options, and the fused GPU graphs: those whose operators have CPU kernels are
compared with the unfused graphs on the CPU provider; the CUDA-only ones are shown to need CUDA. Execution on
CUDA carries the ``gpu`` marker and is skipped here."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import sdrt
from sdrt import manifest as mf
from sdrt.cli import main
from sdrt.errors import BackendUnavailable
from sdrt.runtimes import onnxruntime as ortrt
from sdrt.runtimes import openvino, ort_graphs, pick, tensorrt, trt_build
from sdrt.runtimes.builds import BuildOptions
from sdrt.specs import SPECS, spec_for

REAL_SESSION = ort.InferenceSession
CPU = "CPUExecutionProvider"
SIZES = dict(B=2, H=64, W=48, S=77, D=32, C=4, CI=4, V=1000)


def fake_providers(monkeypatch, behaviour: dict[str, str]):
    """Make ONNX Runtime list GPU providers that ``raise``, ``fall back`` to the CPU (what it does when the CUDA
    libraries are missing), or ``work`` (reported as used, computed on the CPU)."""
    listed = [*behaviour, CPU]

    class Session:
        def __init__(self, model, sess_options=None, providers=None, **kw):
            first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
            if behaviour.get(first) == "raise":
                raise RuntimeError(f"{first}: libnvinfer.so.10: cannot open shared object file")
            self._inner = REAL_SESSION(model, sess_options=sess_options, providers=[CPU])
            self._providers = [first, CPU] if behaviour.get(first) == "work" else [CPU]
            self.asked = providers

        def get_providers(self):
            return self._providers

        def __getattr__(self, name):
            return getattr(self._inner, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    monkeypatch.setattr(ort, "InferenceSession", Session)
    ortrt.broken_providers.cache_clear()
    return Session


@pytest.fixture(autouse=True)
def fresh_probe_cache():
    ortrt.broken_providers.cache_clear()
    yield
    ortrt.broken_providers.cache_clear()


def test_probe_graph_is_valid_onnx_and_runs_on_the_cpu():
    import onnx
    onnx.checker.check_model(onnx.load_from_string(ortrt.probe_model()), full_check=True)
    assert ortrt.probe(ort, CPU) is None


def test_listed_but_failing_gpu_providers_fall_through_with_their_reason(monkeypatch, caplog, tiny_export):
    fake_providers(monkeypatch, {"TensorrtExecutionProvider": "raise", "CUDAExecutionProvider": "fall back"})
    with caplog.at_level(logging.INFO):
        chosen = pick("auto")
    broken = ortrt.broken_providers()
    assert "libnvinfer.so.10" in broken["TensorrtExecutionProvider"]
    assert "fell back to the CPU" in broken["CUDAExecutionProvider"]
    assert chosen is (openvino if openvino.available() else ortrt)
    text = caplog.text
    assert "TensorrtExecutionProvider is installed but cannot run here" in text
    assert "not onnxruntime-gpu (TensorrtExecutionProvider: RuntimeError" in text
    assert "not tensorrt" in text
    manifest = mf.read(tiny_export)
    runtime = ortrt.load(tiny_export / manifest.components["unet"].file, SPECS["unet"])
    assert runtime.session.asked == [CPU] and runtime.device == "cpu" and runtime._binding is None
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider: ONNX Runtime fell back"):
        ortrt.load(tiny_export / manifest.components["unet"].file, SPECS["unet"],
                   providers=("CUDAExecutionProvider", CPU))


def test_a_working_gpu_provider_comes_before_openvino(monkeypatch, caplog, tiny_export):
    fake_providers(monkeypatch, {"TensorrtExecutionProvider": "raise", "CUDAExecutionProvider": "work"})
    with caplog.at_level(logging.INFO):
        assert pick("auto") is ortrt
    assert "runtime auto: onnxruntime-gpu" in caplog.text
    manifest = mf.read(tiny_export)
    runtime = ortrt.load(tiny_export / manifest.components["unet"].file, SPECS["unet"])
    (provider, options), cpu = runtime.session.asked
    assert provider == "CUDAExecutionProvider" and cpu == CPU and options["device_id"] == 0
    assert runtime.device == "cuda" and runtime._binding is not None     # IO binding on a GPU provider


def test_tensorrt_comes_first_when_it_works(monkeypatch):
    monkeypatch.setattr(tensorrt, "available", lambda: True)
    assert pick("auto") is tensorrt


def test_io_binding_gives_the_outputs_of_run(tiny_export):
    manifest = mf.read(tiny_export)
    for component in ("text_encoder", "unet"):
        spec = SPECS[component]
        path = tiny_export / manifest.components[component].file
        x = spec.sample(np.random.default_rng(0), **SIZES)
        plain = ortrt.load(path, spec, io_binding=False).run(x)
        bound = ortrt.load(path, spec, io_binding=True)
        for _ in range(2):                          # the binding is reused call after call
            out = bound.run(x)
            assert list(out) == list(plain)
            for name in plain:
                np.testing.assert_array_equal(out[name], plain[name])


def test_tensorrt_ep_options_use_the_export_cache_and_the_profiles(tiny_export):
    manifest = mf.read(tiny_export)
    profile = trt_build.profile(SPECS["unet"], manifest.architecture,
                                trt_build.shape_range(BuildOptions(backend="tensorrt"), 64))
    options = ortrt.provider_options("TensorrtExecutionProvider", tiny_export, profile, fp16=True)
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"] and options["trt_fp16_enable"]
    assert options["trt_engine_cache_path"] == str(tiny_export / "cache" / "onnxruntime" / "tensorrt_ep")
    assert options["trt_profile_min_shapes"] == "sample:1x4x8x8,timestep:1,encoder_hidden_states:1x77x32"
    assert options["trt_profile_max_shapes"] == "sample:8x4x128x128,timestep:8,encoder_hidden_states:8x231x32"
    assert ortrt._profile(tiny_export, SPECS["unet"]) == profile
    cuda = ortrt.provider_options("CUDAExecutionProvider", tiny_export, profile, fp16=True, device_id=1)
    assert cuda["device_id"] == 1 and cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE"


@pytest.fixture(scope="module")
def cpu_fused(tiny_export, tmp_path_factory):
    """The text encoder and UNet fused with the fusions that have CPU kernels (fused once per module)."""
    manifest, root = mf.read(tiny_export), tmp_path_factory.mktemp("fused")
    return {c: (tiny_export / manifest.components[c].file, root / f"{c}.onnx",
                ort_graphs.fuse(tiny_export / manifest.components[c].file, root / f"{c}.onnx", c, cpu_only=True))
            for c in ("text_encoder", "unet")}


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
@pytest.mark.parametrize("fp16", [False, True])
def test_fusions_with_cpu_kernels_keep_the_numerics(cpu_fused, tmp_path, component, fp16):
    source, target, fused = cpu_fused[component]
    assert set(fused) == {"text_encoder": {"SkipLayerNormalization", "QuickGelu"},
                          "unet": {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "Gelu"}}[component]
    if fp16:
        from onnxruntime.transformers.onnx_model import OnnxModel
        import onnx
        model = OnnxModel(onnx.load(str(target)))
        ort_graphs.half(model)
        target = tmp_path / "fp16.onnx"
        model.save_model_to_file(str(target))
    x = SPECS[component].sample(np.random.default_rng(0), **SIZES)
    reference = REAL_SESSION(str(source), providers=[CPU]).run(None, x)
    out = REAL_SESSION(str(target), providers=[CPU]).run(None, x)
    for a, b in zip(reference, out):
        assert b.dtype == np.float32                     # fp16 graphs keep fp32 inputs and outputs
        np.testing.assert_allclose(b, a, atol=1e-2 if fp16 else 1e-5, rtol=1e-2 if fp16 else 1e-5)


@pytest.fixture(scope="module")
def xl_export(tmp_path_factory):
    """A tiny random SDXL export (no torch parity check: the SDXL tests hold these graphs to torch)."""
    pytest.importorskip("diffusers")
    from sdrt.exporters import ExportOptions, export
    from sdrt.exporters.random_model import build_random_model
    root = tmp_path_factory.mktemp("sdxl")
    export(str(build_random_model(root / "model", "tiny-sdxl", seed=4)), root / "sdrt",
           ExportOptions(check_parity=False), progress=False)
    return root / "sdrt"


@pytest.mark.parametrize("component, fusions", [("unet", {"MultiHeadAttention", "SkipLayerNormalization"}),
                                                ("text_encoder_2", {"SkipLayerNormalization"})])
def test_sdxl_graphs_take_the_unet_and_clip_fusions(xl_export, tmp_path, component, fusions):
    """ONNX Runtime's optimizer fuses SDXL's UNet as a "unet" and OpenCLIP-G as a "clip" (as its own SD pipeline
    optimizer does); the fusions with CPU kernels keep the numerics of the unfused graph."""
    manifest = mf.read(xl_export)
    comp = manifest.components[component]
    target = tmp_path / f"{component}.onnx"
    assert fusions <= set(ort_graphs.fuse(xl_export / comp.file, target, comp.spec, cpu_only=True))
    arch = manifest.architecture
    x = spec_for(comp, arch).sample(np.random.default_rng(0), B=2, H=64, W=48, S=77, D=arch["cross_attention_dim"],
                                    C=4, CI=4, P=arch["text_embeds_dim"], T=arch["time_ids"], V=1000)
    reference = REAL_SESSION(str(xl_export / comp.file), providers=[CPU]).run(None, x)
    for a, b in zip(reference, REAL_SESSION(str(target), providers=[CPU]).run(None, x)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def test_sdxl_gpu_build_fuses_every_graph(xl_export, capsys):
    assert main(["build", str(xl_export), "--backend", "onnxruntime", "--device", "GPU"]) == 0
    entry = Path(capsys.readouterr().out.strip().rsplit(" -> ", 1)[1])
    fused = json.loads((entry / "build.json").read_text())["fused"]
    assert set(fused) == {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    assert {"MultiHeadAttention", "NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu"} <= set(fused["unet"])
    assert {"SkipLayerNormalization"} <= set(fused["text_encoder_2"])


def test_gpu_build_is_made_here_and_used_only_where_a_gpu_provider_works(tiny_export, tmp_path, monkeypatch, capsys):
    tiny_export = shutil.copytree(tiny_export, tmp_path / "export", ignore=shutil.ignore_patterns("cache"))
    assert main(["build", str(tiny_export), "--backend", "onnxruntime", "--device", "GPU", "--precision", "fp16"]) == 0
    entry = tiny_export / capsys.readouterr().out.strip().rsplit(" -> ", 1)[1].split(str(tiny_export) + "/")[1]
    record = json.loads((entry / "build.json").read_text())
    assert record["options"] == {"precision": "fp16", "device": "GPU", "fusion": ort_graphs.SCHEME}
    assert set(record["components"]) == set(mf.read(tiny_export).components)
    for component in ("unet", "vae_decoder", "vae_encoder"):     # the VAE's fusions are all CUDA-only
        assert {"NhwcConv", "GroupNorm", "SkipGroupNorm"} <= set(record["fused"][component])
        assert set(record["fused"][component]) <= {*ort_graphs.CUDA_ONLY, "MultiHeadAttention",
                                                   "SkipLayerNormalization"}
    with pytest.raises(Exception, match="NOT_IMPLEMENTED.*NhwcConv"):         # no CPU kernels for them
        REAL_SESSION(str(entry / "unet.onnx"), providers=[CPU])
    manifest = mf.read(tiny_export)
    assert ortrt.artifacts(tiny_export, manifest, None) == manifest.components       # no GPU provider here
    fake_providers(monkeypatch, {"CUDAExecutionProvider": "work"})
    used = ortrt.artifacts(tiny_export, manifest, "fp16")
    assert used["unet"].file == str(entry.relative_to(tiny_export) / "unet.onnx")
    assert ortrt.artifacts(tiny_export, manifest, None) == manifest.components       # an fp32 export: fp32
    assert main(["build", str(tiny_export), "--backend", "onnxruntime", "--device", "GPU", "--precision", "int8"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(ortrt.gpu_unusable() is not None, reason=f"ONNX Runtime GPU: {ortrt.gpu_unusable()}")
@pytest.mark.parametrize("precision", [None, "fp16"])
def test_cuda_images_match_the_cpu(tiny_export, precision):
    if precision:
        sdrt.build(tiny_export, BuildOptions(backend="onnxruntime", device="GPU", precision=precision), progress=False)
    images = []
    for providers in (("CPUExecutionProvider",), ("CUDAExecutionProvider", CPU)):
        pipe = sdrt.load(tiny_export, runtime="onnxruntime", precision=precision if len(providers) > 1 else None,
                         providers=providers, progress=False)
        images.append(np.asarray(pipe.txt2img("a cat", width=64, height=64, steps=4, seed=1).images[0], np.int16))
    diff = np.abs(images[0] - images[1])
    assert diff.mean() < (1.0 if precision else 0.2) and diff.max() <= (8 if precision else 2)
