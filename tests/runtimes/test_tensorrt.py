"""TensorRT backend. On any machine: shape profiles derived from the specs, the engine cache key, option
validation and the profile error. On a CUDA GPU with TensorRT (``gpu`` marker; skipped here, where neither
exists): engines against ONNX Runtime's CPU provider, CUDA-graph replay against eager launches, refit against a
fresh build. Nothing here fakes the tensorrt module."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sdrt import manifest as mf
from sdrt.cli import main
from sdrt.errors import BackendUnavailable, InvalidRequest, ModelFolderError, ProfileError
from sdrt.runtimes import backend, tensorrt, trt_build
from sdrt.runtimes.builds import BuildOptions
from sdrt.specs import ALL_SPECS, SPECS, UNET, controlnet, spec_for, unet_control

# SD 1.5's ControlNet residuals: (channels, latent downsampling), 12 down blocks and the mid block
SD15_LAYOUT = ((320, 1), (320, 1), (320, 1), (320, 2), (640, 2), (640, 2), (640, 4), (1280, 4), (1280, 4),
               (1280, 8), (1280, 8), (1280, 8), (1280, 8))
SD15_ARCH = {"cross_attention_dim": 768, "latent_channels": 4, "unet_in_channels": 4, "sample_size": 64,
             "vae_factor": 8, "control_residuals": [list(r) for r in SD15_LAYOUT]}
H100 = trt_build.Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0))


def sd15(**changes) -> mf.Manifest:
    """An SD 1.5 manifest with a ControlNet (no files: profiles and keys read only the manifest)."""
    comps = {name: mf.Component(name, f"{name}.onnx") for name in SPECS}
    files = {f"{name}.onnx": f"sha-{name}" for name in SPECS} | {"unet_control.onnx": "sha-uc",
                                                                 "controlnet/canny.onnx": "sha-canny"}
    fields = dict(source="sd15", architecture=SD15_ARCH, components=comps, files=files,
                  controlnets={"canny": mf.Component("controlnet", "controlnet/canny.onnx")},
                  unet_control=mf.Component("unet_control", "unet_control.onnx"))
    return mf.Manifest(**(fields | changes))


def profiles(options: BuildOptions, manifest: mf.Manifest | None = None) -> dict:
    return trt_build.settings(manifest or sd15(), options, H100)["profiles"]


def test_static_profile_is_one_shape_with_the_cfg_batch():
    p = profiles(BuildOptions(backend="tensorrt", static=(512, 768), batch=3))
    for component, shapes in p.items():
        for lo, opt, hi in shapes.values():
            assert lo == opt == hi, component
    assert p["unet"]["sample"][0] == [6, 4, 96, 64]            # 3 images x [uncond; cond], latent H/8 x W/8
    assert p["unet"]["encoder_hidden_states"][0] == [6, 77, 768]
    assert p["unet"]["timestep"][0] == [6]
    assert p["text_encoder"]["input_ids"][0] == [1, 77]        # one 77-token chunk at a time
    assert p["vae_decoder"]["latent_sample"][0] == [1, 4, 96, 64]   # image by image
    assert p["vae_encoder"]["sample"][0] == [1, 3, 768, 512]


def test_sdxl_and_lcm_profiles():
    """SDXL's UNet also takes text_embeds and time_ids per row; an LCM-distilled UNet runs without CFG rows."""
    static = trt_build.shape_range(BuildOptions(backend="tensorrt", static=(1024, 1024), batch=1), 1024)
    sdxl = dict(SD15_ARCH, cross_attention_dim=2048, text_embeds_dim=1280, time_ids=6)
    p = trt_build.profile(ALL_SPECS["unet_sdxl"], sdxl, static)
    assert p["sample"][0] == (2, 4, 128, 128) and p["encoder_hidden_states"][0] == (2, 77, 2048)
    assert p["text_embeds"][0] == (2, 1280) and p["time_ids"][0] == (2, 6)
    assert trt_build.profile(ALL_SPECS["text_encoder_2"], sdxl, static)["input_ids"][0] == (1, 77)
    lcm = dict(SD15_ARCH, time_cond_proj_dim=256)
    p = trt_build.profile(SPECS["unet_lcm"], lcm, trt_build.shape_range(
        BuildOptions(backend="tensorrt", static=(512, 512), batch=2), 512))
    assert p["sample"][0] == (2, 4, 64, 64) and p["timestep_cond"][0] == (2, 256)


def test_no_cfg_profiles_hold_one_unet_row_per_image():
    """--no-cfg (SD-Turbo style, guidance_scale <= 1): the UNet, unet_control and the ControlNets see n rows for n
    images, static and dynamic; the other graphs and an LCM UNet (never CFG) are as without it."""
    static = profiles(BuildOptions(backend="tensorrt", static=(512, 768), batch=3, cfg=False))
    guided = profiles(BuildOptions(backend="tensorrt", static=(512, 768), batch=3))
    denoisers = ("unet", "unet_control", "controlnet/canny")
    for name in denoisers:
        assert static[name]["sample"] == [[3, 4, 96, 64]] * 3, name
        assert static[name]["encoder_hidden_states"] == [[3, 77, 768]] * 3, name
    assert static["unet_control"]["mid_block_additional_residual"] == [[3, 1280, 12, 8]] * 3
    assert {n: p for n, p in static.items() if n not in denoisers} == \
        {n: p for n, p in guided.items() if n not in denoisers}
    dynamic = profiles(BuildOptions(backend="tensorrt", max_batch=2, cfg=False))
    assert dynamic["unet"]["sample"] == [[1, 4, 32, 32], [1, 4, 64, 64], [2, 4, 128, 128]]
    lcm = dict(SD15_ARCH, time_cond_proj_dim=256)
    for cfg in (True, False):
        p = trt_build.profile(SPECS["unet_lcm"], lcm, trt_build.shape_range(
            BuildOptions(backend="tensorrt", static=(512, 512), batch=2, cfg=cfg), 512), cfg)
        assert p["sample"][0] == (2, 4, 64, 64)


def test_a_guidance_mismatch_on_a_static_engine_names_the_flag():
    guided = unet_profile(BuildOptions(backend="tensorrt", static=(512, 512)))
    with pytest.raises(ProfileError, match=r"profile \(2, 4, 64, 64\) \(512x512\); rebuild with `sdrt build OUT "
                                           r"--backend tensorrt --static 512x512 --batch 1 --no-cfg` \(1 image per "
                                           r"request at guidance_scale <= 1\)$"):
        tensorrt.check_profile(UNET, feeds(1, 512, 512), guided)            # guidance_scale 0, 1 image
    unguided = unet_profile(BuildOptions(backend="tensorrt", static=(512, 512), cfg=False))
    with pytest.raises(ProfileError, match=r"profile \(1, 4, 64, 64\) \(512x512\); rebuild with `sdrt build OUT "
                                           r"--backend tensorrt --static 512x512 --batch 1` \(1 image per request "
                                           r"with guidance_scale > 1\) or `.* --batch 2 --no-cfg`"):
        tensorrt.check_profile(UNET, feeds(2, 512, 512), unguided)          # guidance_scale 7.5, 1 image
    tensorrt.check_profile(UNET, feeds(1, 512, 512), unguided)
    vae = {k: tuple(map(tuple, v)) for k, v in profiles(BuildOptions(backend="tensorrt", static=(512, 512),
                                                                     batch=2))["vae_decoder"].items()}
    with pytest.raises(ProfileError, match=r"--static 512x768 --batch N` \(N images per request\)$"):
        tensorrt.check_profile(ALL_SPECS["vae_decoder"], {"latent_sample": (1, 4, 96, 64)}, vae)   # image by image


def test_dynamic_profile_spans_min_to_max_and_guidance_off_at_the_bottom():
    p = profiles(BuildOptions(backend="tensorrt", min_size=(256, 320), opt_size=(512, 512), max_size=(768, 1024),
                              max_batch=2, prompt_chunks=4))
    assert p["unet"]["sample"] == [[1, 4, 40, 32], [2, 4, 64, 64], [4, 4, 128, 96]]
    assert p["unet"]["encoder_hidden_states"] == [[1, 77, 768], [2, 77, 768], [4, 308, 768]]   # 77 * k tokens
    assert p["text_encoder"]["input_ids"] == [[1, 77]] * 3
    assert p["vae_decoder"]["latent_sample"] == [[1, 4, 40, 32], [1, 4, 64, 64], [1, 4, 128, 96]]
    assert p["vae_encoder"]["sample"] == [[1, 3, 320, 256], [1, 3, 512, 512], [1, 3, 1024, 768]]


def test_dynamic_defaults_follow_the_native_size():
    p = profiles(BuildOptions(backend="tensorrt"))
    assert p["unet"]["sample"] == [[1, 4, 32, 32], [2, 4, 64, 64], [8, 4, 128, 128]]   # 256..512..1024, batch 4
    assert p["unet"]["encoder_hidden_states"][2] == [8, 231, 768]                      # 3 chunks
    tiny = replace(sd15(), architecture={**SD15_ARCH, "sample_size": 8})             # a 64 px model
    assert profiles(BuildOptions(backend="tensorrt"), tiny)["unet"]["sample"][0] == [1, 4, 8, 8]


@pytest.mark.parametrize("static", [True, False])
def test_controlnet_residuals_match_unet_control_inputs(static):
    """Every residual a ControlNet produces at each profile corner is what unet_control takes, and at 512x512
    they are SD 1.5's residual shapes."""
    options = BuildOptions(backend="tensorrt", static=(512, 512)) if static else BuildOptions(backend="tensorrt")
    p = profiles(options)
    net, control = controlnet(SD15_LAYOUT), unet_control(SD15_LAYOUT)
    assert set(p) == {*SPECS, "unet_control", "controlnet/canny"}
    assert p["controlnet/canny"]["controlnet_cond"][1] == [2, 3, 512, 512]
    assert p["controlnet/canny"]["conditioning_scale"] == [[1]] * 3
    for produced, taken in zip(net.outputs, control.inputs[3:]):
        for corner in range(3):
            guidance = static or corner > 0
            dims = trt_build.dims("controlnet", SD15_ARCH, (trt_build.shape_range(options, 512).lo,
                                                            trt_build.shape_range(options, 512).opt,
                                                            trt_build.shape_range(options, 512).hi)[corner], guidance)
            assert p["unet_control"][taken.name][corner] == list(produced.resolve(dims)), taken.name
    opt = {t.name: p["unet_control"][t.name][1] for t in control.inputs[3:]}
    assert opt["down_block_additional_residuals_0"] == [2, 320, 64, 64]
    assert opt["down_block_additional_residuals_11"] == [2, 1280, 8, 8]
    assert opt["mid_block_additional_residual"] == [2, 1280, 8, 8]
    assert p["unet_control"]["sample"] == p["unet"]["sample"]


def test_spec_for_every_graph_of_a_manifest():
    """One lookup: the fixed specs by name, the ControlNet graphs from the export's residual layout (SD and SDXL)."""
    manifest = sd15()
    assert spec_for(manifest.components["unet"], SD15_ARCH) is ALL_SPECS["unet"]
    assert spec_for(manifest.unet_control, SD15_ARCH) == unet_control(SD15_LAYOUT)
    assert spec_for(manifest.controlnets["canny"], SD15_ARCH) == controlnet(SD15_LAYOUT)
    xl = {n: spec_for(mf.Component(n, "x.onnx"), SD15_ARCH) for n in ("unet_control_sdxl", "controlnet_sdxl")}
    assert xl == {"unet_control_sdxl": unet_control(SD15_LAYOUT, "unet_control_sdxl"),
                  "controlnet_sdxl": controlnet(SD15_LAYOUT, "controlnet_sdxl")}
    assert {n: s for n, (_, s) in trt_build.graphs(manifest).items()} == {
        **{n: spec_for(c, SD15_ARCH) for n, c in manifest.components.items()},
        "unet_control": unet_control(SD15_LAYOUT), "controlnet/canny": controlnet(SD15_LAYOUT)}


def test_fp16_export_profiles_and_refit_list():
    s = trt_build.settings(sd15(), BuildOptions(backend="tensorrt", precision="fp16"), H100)
    assert s["precision"] == "fp16" and s["refit"] == ["text_encoder", "unet", "unet_control"]
    s = trt_build.settings(sd15(), BuildOptions(backend="tensorrt", precision="int8"), H100)
    assert s["refit"] == ["text_encoder", "unet_control"]   # the quantized UNet is not LoRA-refittable
    half = {n: replace(c, precision="fp16") for n, c in sd15().components.items()}
    with pytest.raises(InvalidRequest, match="re-export without --fp16"):
        trt_build.settings(sd15(components=half), BuildOptions(backend="tensorrt", precision="int8"), H100)


def key(manifest=None, options=BuildOptions(backend="tensorrt"), gpu=H100, version="10.13.0.35") -> str:
    manifest = manifest or sd15()
    return trt_build.key(manifest, trt_build.settings(manifest, options, gpu), version)


def test_cache_key_changes_with_everything_an_engine_depends_on():
    base = key()
    assert key() == base                                                           # deterministic
    changed = {
        "GPU model": key(gpu=replace(H100, name="NVIDIA A100-SXM4-80GB")),
        "compute capability": key(gpu=replace(H100, compute_capability=(8, 9))),
        "TensorRT version": key(version="10.14.1"),
        "precision": key(options=BuildOptions(backend="tensorrt", precision="fp16")),
        "static profile": key(options=BuildOptions(backend="tensorrt", static=(512, 512))),
        "static batch": key(options=BuildOptions(backend="tensorrt", static=(512, 512), batch=2)),
        "no CFG": key(options=BuildOptions(backend="tensorrt", static=(512, 512), batch=2, cfg=False)),
        "dynamic no CFG": key(options=BuildOptions(backend="tensorrt", cfg=False)),
        "max size": key(options=BuildOptions(backend="tensorrt", max_size=(768, 768))),
        "max batch": key(options=BuildOptions(backend="tensorrt", max_batch=2)),
        "prompt chunks": key(options=BuildOptions(backend="tensorrt", prompt_chunks=2)),
        "UNet source": key(sd15(files={**sd15().files, "unet.onnx": "sha-other"})),
        "ControlNet source": key(sd15(files={**sd15().files, "controlnet/canny.onnx": "sha-other"})),
        "architecture": key(sd15(architecture={**SD15_ARCH, "cross_attention_dim": 1024})),
    }
    assert base not in changed.values()
    assert len(set(changed.values())) == len(changed), changed
    assert key(gpu=replace(H100, index=1)) == base          # a second GPU of the same model shares engines


def test_options_are_validated():
    def check(**kw):
        BuildOptions(backend="tensorrt", **kw).check()
    with pytest.raises(InvalidRequest, match="use one or the other"):
        check(static=(512, 512), max_size=(768, 768))
    with pytest.raises(InvalidRequest, match="--max-batch .* --static"):
        check(static=(512, 512), max_batch=2)
    with pytest.raises(InvalidRequest, match="--min 250x256: .* multiples of 8"):
        check(min_size=(250, 256))
    with pytest.raises(InvalidRequest, match="--max-batch must be >= 1"):
        check(max_batch=0)
    with pytest.raises(InvalidRequest, match="grow from --min to --opt to --max"):
        trt_build.shape_range(BuildOptions(backend="tensorrt", min_size=(768, 768), max_size=(512, 512)), 512)
    assert [tensorrt.device_index(d) for d in ("CPU", "GPU", "GPU.1", "cuda", "cuda:2", None)] == [0, 0, 1, 0, 2, 0]
    with pytest.raises(InvalidRequest, match="CUDA device"):
        tensorrt.device_index("NPU")


def unet_profile(options: BuildOptions) -> dict:
    return {k: tuple(map(tuple, v)) for k, v in profiles(options)["unet"].items()}


def feeds(batch: int, width: int, height: int, tokens: int = 77) -> dict[str, tuple]:
    return {"sample": (batch, 4, height // 8, width // 8), "timestep": (batch,),
            "encoder_hidden_states": (batch, tokens, 768)}


def test_a_request_inside_the_profile_passes():
    dynamic = unet_profile(BuildOptions(backend="tensorrt"))
    for shapes in (feeds(1, 256, 256), feeds(2, 512, 768), feeds(8, 1024, 1024, 231)):
        tensorrt.check_profile(UNET, shapes, dynamic)
    tensorrt.check_profile(UNET, feeds(2, 512, 512), unet_profile(BuildOptions(backend="tensorrt", static=(512, 512))))


@pytest.mark.parametrize("shapes, message", [
    (feeds(2, 1280, 512), r"profile min \(1, 4, 32, 32\) \.\. max \(8, 4, 128, 128\) \(256x256\.\.1024x1024\); "
                          r"rebuild with `sdrt build out --backend tensorrt --max 1280x1024 --max-batch 4`"),
    (feeds(2, 192, 512), r"rebuild with `sdrt build out --backend tensorrt --min 192x256 --max 1024x1024"),
    (feeds(12, 512, 512), r"--max 1024x1024 --max-batch 6`"),
    (feeds(2, 512, 512, 308), r"'encoder_hidden_states' has shape \(2, 308, 768\).*--prompt-chunks 4`"),
])
def test_a_request_outside_a_dynamic_profile_names_it_and_the_rebuild_flags(shapes, message):
    with pytest.raises(ProfileError, match=message):
        tensorrt.check_profile(UNET, shapes, unet_profile(BuildOptions(backend="tensorrt")), Path("out"))


def test_a_request_outside_a_static_profile_names_the_static_flags():
    static = unet_profile(BuildOptions(backend="tensorrt", static=(512, 512)))
    with pytest.raises(ProfileError, match=r"'sample' has shape \(2, 4, 96, 64\), outside this TensorRT engine's "
                                           r"profile \(2, 4, 64, 64\) \(512x512\); rebuild with `sdrt build OUT "
                                           r"--backend tensorrt --static 512x768 --batch 1`"):
        tensorrt.check_profile(UNET, feeds(2, 512, 768), static)
    with pytest.raises(ProfileError, match="--static 512x512 --batch 2`"):
        tensorrt.check_profile(UNET, feeds(4, 512, 512), static)


def test_range_flags_are_tensorrt_only(tiny_export, capsys):
    for backend_name, message in (("openvino", "--max set TensorRT shape ranges"),
                                  ("onnxruntime", "and --max-batch apply to OpenVINO and TensorRT builds")):
        assert main(["build", str(tiny_export), "--backend", backend_name, "--max", "768x768"]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.skipif(tensorrt.available(), reason="TensorRT works here")
def test_without_tensorrt_the_backend_says_why(tiny_export, capsys):
    with pytest.raises(BackendUnavailable, match="runtime 'tensorrt' cannot run here: tensorrt is not installed"):
        backend("tensorrt")
    assert main(["build", str(tiny_export), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install sdrt[tensorrt]" in err[0]


def test_auto_goes_on_when_tensorrt_has_no_engines_for_the_export(tiny_export, monkeypatch, caplog):
    """A stand-in for an installed TensorRT whose artifacts() finds no build (selection logic only)."""
    import logging

    import sdrt

    def no_build(folder, manifest, precision=None):
        raise ModelFolderError(f"{folder} has no TensorRT build for this GPU")
    monkeypatch.setattr(tensorrt, "available", lambda: True)
    monkeypatch.setattr(tensorrt, "artifacts", no_build)
    with caplog.at_level(logging.WARNING):
        pipe = sdrt.load(tiny_export, progress=False)
    assert "runtime auto: not tensorrt (" in caplog.text and "has no TensorRT build" in caplog.text
    assert type(pipe.models.unet.inner).__module__ in ("sdrt.runtimes.openvino", "sdrt.runtimes.onnxruntime")
    with pytest.raises(ModelFolderError, match="has no TensorRT build"):
        sdrt.load(tiny_export, runtime="tensorrt", progress=False)       # asked for by name: no fall-through


# -- on a CUDA GPU with TensorRT ------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_tensorrt = pytest.mark.skipif(not tensorrt.available(), reason=f"TensorRT: {tensorrt.unusable()}")
SMALL = dict(min_size=(32, 32), opt_size=(64, 64), max_size=(128, 128), max_batch=2)


@pytest.fixture(scope="module")
def engines(tiny_export):
    from sdrt.runtimes import build
    return build(tiny_export, BuildOptions(backend="tensorrt", **SMALL), progress=False)


def run_both(folder: Path, engine_entry: Path, component: str, sizes: dict):
    from sdrt.runtimes import onnxruntime
    manifest = mf.read(folder)
    spec = spec_for(manifest.components[component], manifest.architecture)
    x = spec.sample(np.random.default_rng(0), **sizes)
    reference = onnxruntime.load(folder / manifest.components[component].file, spec,
                                 providers=("CPUExecutionProvider",)).run(x)
    return reference, tensorrt.load(engine_entry / trt_build.engine_file(component), spec).run(x), spec, x


@gpu
@needs_tensorrt
@pytest.mark.parametrize("component", list(SPECS))
def test_engines_match_onnxruntime_cpu(tiny_export, engines, component):
    sizes = dict(B=1 if component != "unet" else 2, H=48, W=64, S=77, D=32, C=4, CI=4, V=1000)
    reference, out, spec, _ = run_both(tiny_export, engines, component, sizes)
    for t in spec.outputs:
        np.testing.assert_allclose(out[t.name], reference[t.name], atol=5e-3, rtol=5e-3, err_msg=t.name)


@gpu
@needs_tensorrt
def test_images_match_onnxruntime_cpu(tiny_export, engines):
    import sdrt
    images = [sdrt.load(tiny_export, runtime=r, progress=False).txt2img("a cat", width=64, height=64, steps=4,
                                                                        seed=1).images[0]
              for r in ("onnxruntime", "tensorrt")]
    diff = np.abs(np.asarray(images[0], np.int16) - np.asarray(images[1], np.int16))
    assert diff.mean() < 1.0 and diff.max() <= 8


@gpu
@needs_tensorrt
def test_cuda_graph_replay_equals_eager(tiny_export):
    from sdrt.runtimes import build
    entry = build(tiny_export, BuildOptions(backend="tensorrt", static=(64, 64)), progress=False)
    spec = SPECS["unet"]
    graphed = tensorrt.load(entry / "unet.engine", spec, cuda_graph=True)
    eager = tensorrt.load(entry / "unet.engine", spec, cuda_graph=False)
    assert graphed.static and graphed.cuda_graph and not eager.cuda_graph
    for seed in range(3):                           # capture on the first call, replay on the others
        x = spec.sample(np.random.default_rng(seed), B=2, H=64, W=64, S=77, D=32, C=4, CI=4)
        np.testing.assert_array_equal(graphed.run(x)["out_sample"], eager.run(x)["out_sample"])
    assert graphed._graph is not None
    with pytest.raises(ProfileError, match="--static 64x128"):
        graphed.run(spec.sample(np.random.default_rng(0), B=2, H=128, W=64, S=77, D=32, C=4, CI=4))


@gpu
@needs_tensorrt
def test_refit_equals_a_fresh_build(tiny_export, engines, tmp_path):
    """A LoRA-like change refitted into the engine gives the outputs of an engine built from the changed graph;
    refitting back restores the original outputs exactly."""
    import shutil

    from sdrt.weights import onnx_file
    manifest = mf.read(tiny_export)
    spec = SPECS["unet"]
    source = tiny_export / manifest.components["unet"].file
    index = onnx_file.read_index(source)
    name = next(n for n, t in index.initializers.items() if t.dtype == "float32" and len(t.shape) == 4)
    changed = {name: tensorrt.initializer(source, name) * 1.5}
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy, ignore=shutil.ignore_patterns("cache"))
    (copy / "unet.onnx").write_bytes(onnx_file.patched(index, changed))
    raw = mf.read(copy, verify=False)
    mf.write(copy, replace(raw, files={**raw.files, "unet.onnx": mf.sha256(copy / "unet.onnx")}))
    from sdrt.runtimes import build
    fresh = tensorrt.load(build(copy, BuildOptions(backend="tensorrt", **SMALL), progress=False) / "unet.engine", spec)
    runtime = tensorrt.load(engines / "unet.engine", spec)
    x = spec.sample(np.random.default_rng(0), B=2, H=64, W=64, S=77, D=32, C=4, CI=4)
    before = runtime.run(x)["out_sample"]
    runtime.refit(changed)
    # two builds may pick other tactics (TF32 in fp32 engines); one shared timing cache makes that unlikely
    np.testing.assert_allclose(runtime.run(x)["out_sample"], fresh.run(x)["out_sample"], atol=2e-3, rtol=2e-3)
    runtime.refit(None)
    np.testing.assert_array_equal(runtime.run(x)["out_sample"], before)
