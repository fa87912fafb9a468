"""ControlNet: export, control maps, and image parity with diffusers' ControlNet pipelines on tiny models.

Reference: diffusers' StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline (MultiControlNet for several units,
control_guidance_start/end, guess_mode) over the same tiny model and a random-weight ControlNet, CPU
generators seeded like sdrt. A1111's "My prompt is more important" (soft weights on both batches) has no
diffusers pipeline; its reference is diffusers with the ControlNet's own guess-mode scaling forced on.
"""
from __future__ import annotations

import functools
import importlib

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt import manifest as mf
from sdrt import specs
from sdrt.cli import main
from sdrt.errors import ExportError, InvalidRequest
from sdrt.pipelines import samplers
from sdrt.pipelines.control import Control, control_map, resize
from sdrt.runtimes import BACKENDS

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")
onnx = pytest.importorskip("onnx")

from sdrt.exporters import ExportOptions, export                                                  # noqa: E402
from sdrt.exporters.controlnet import load_controlnets, parse                                     # noqa: E402
from sdrt.exporters.sources import load_source                                                    # noqa: E402

from .test_parity import (NEGATIVE, PROMPT, SIZE, compare, init_image, mask_image,  # noqa: E402,F401
                          pixels)

RUNTIME = "onnxruntime"
STEPS = 5                      # test_parity runs 8; here each step also runs the ControlNets
TINY_LAYOUT = [[32, 1], [32, 1], [32, 1], [32, 2], [64, 2], [64, 2], [64, 2]]   # conv_in, 2 blocks of 2 + down


@pytest.fixture(scope="session")
def inpaint_control_export(tmp_path_factory, tiny_inpaint_model_dir, controlnet_dirs):
    """No torch parity check here (control_export has one): test_inpaint_9_channel compares whole images."""
    out = tmp_path_factory.mktemp("inpaint_control_export") / "sdrt"
    options = ExportOptions(controlnets=(f"canny={controlnet_dirs['canny']}",), check_parity=False)
    export(str(tiny_inpaint_model_dir), out, options, progress=False)
    return out


@pytest.fixture(scope="module")
def pipe(control_export):
    return sdrt.load(control_export, runtime=RUNTIME, progress=False)


@pytest.fixture(scope="module")
def control_images():
    rng = np.random.default_rng(3)
    edges = np.zeros((SIZE, SIZE, 3), np.uint8)
    edges[::9] = 255
    return {"canny": Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)),
            "depth": Image.fromarray(edges)}


@pytest.fixture(scope="module")
def diffusers_nets(controlnet_dirs):
    return {name: diffusers.ControlNetModel.from_pretrained(path) for name, path in controlnet_dirs.items()}


@functools.cache
def base_pipeline(model_dir):
    return diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                             requires_safety_checker=False)


def reference(model_dir, pipeline_cls, nets, sampler, seed, batch_size=1, steps=STEPS, base=None,
              **kwargs) -> np.ndarray:
    net = nets[0] if len(nets) == 1 else nets
    pipe = getattr(diffusers, pipeline_cls).from_pipe(base or base_pipeline(model_dir), controlnet=net)
    cls, extra = samplers.DIFFUSERS_EQUIVALENT[sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch_size)]
    kwargs.setdefault("controlnet_conditioning_scale", 1.0)    # the img2img/inpaint pipelines default to 0.8/0.5
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
               generator=gens, num_images_per_prompt=batch_size, output_type="np", height=SIZE, width=SIZE,
               **kwargs).images
    return (out * 255).round().astype(np.int16)


def generate(pipe, controls, sampler="Euler a", seed=3, task="txt2img", steps=STEPS, **kwargs):
    kwargs = dict(negative_prompt=NEGATIVE, steps=steps, sampler=sampler, seed=seed, control=controls, **kwargs)
    if task == "txt2img":
        return pipe.txt2img(PROMPT, width=SIZE, height=SIZE, **kwargs)
    return getattr(pipe, task)(*kwargs.pop("images"), PROMPT, **kwargs)


# -- export --------------------------------------------------------------------------------------------

def test_export_lists_controlnets_and_residual_unets(control_export, inpaint_control_export):
    for folder, names, channels in ((control_export, {"canny", "depth"}, 4), (inpaint_control_export, {"canny"}, 9)):
        manifest = mf.read(folder)
        assert set(manifest.controlnets) == names
        assert manifest.architecture["control_residuals"] == TINY_LAYOUT
        for component in (manifest.unet_control, *manifest.controlnets.values()):
            spec = specs.spec_for(component, manifest.architecture)
            assert component.file in manifest.files                # hashed like every exported file
            session = ort.InferenceSession(str(folder / component.file), providers=["CPUExecutionProvider"])
            assert [i.name for i in session.get_inputs()] == [t.name for t in spec.inputs]
            assert [o.name for o in session.get_outputs()] == [t.name for t in spec.outputs]
        graph = onnx.load(str(folder / "unet_control.onnx")).graph
        conv_in = next(n for n in graph.node if n.op_type == "Conv")
        assert next(i for i in graph.initializer if i.name == conv_in.input[1]).dims[1] == channels
        few_step = {"unet_lcm", "vae_encoder_tiny", "vae_decoder_tiny"}
        assert set(manifest.components) == set(specs.SPECS) - few_step      # the plain graphs are unchanged


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_control_graphs_follow_their_specs(control_export, backend_name):
    """Every installed backend runs both graphs with the spec's output names and shapes, at a size whose
    latent (5x7) is odd at every UNet level."""
    if backend_name == "tensorrt":
        pytest.skip("TensorRT runs engines built for production profiles: tests/runtimes/test_tensorrt.py (gpu)")
    backend = importlib.import_module(f"sdrt.runtimes.{backend_name}")
    if not backend.available():
        pytest.skip(f"{backend_name} is not installed")
    manifest = mf.read(control_export)
    sizes = dict(B=3, H=40, W=56, S=77, D=32, C=4, CI=4)
    for component in (manifest.unet_control, manifest.controlnets["depth"]):
        spec = specs.spec_for(component, manifest.architecture)
        out = backend.load(control_export / component.file, spec).run(spec.sample(np.random.default_rng(0), **sizes))
        assert list(out) == [t.name for t in spec.outputs]
        assert [out[t.name].shape for t in spec.outputs] == [t.resolve(sizes) for t in spec.outputs]


def test_plain_generation_loads_no_controlnet(control_export):
    p = sdrt.load(control_export, runtime=RUNTIME, progress=False)
    p.txt2img(PROMPT, width=SIZE, height=SIZE, steps=2, seed=1)
    assert p.models.control.loaded == {} and p.models.variants.loaded == {}
    p.txt2img(PROMPT, width=SIZE, height=SIZE, steps=2, seed=1,
              control=[Control(image=np.zeros((SIZE, SIZE, 3), np.uint8), model="depth")])
    assert set(p.models.control.loaded) == {"depth"} and set(p.models.variants.loaded) == {"unet_control"}


def test_controlnet_names():
    assert parse("canny=lllyasviel/sd-controlnet-canny") == ("canny", "lllyasviel/sd-controlnet-canny")
    assert parse("lllyasviel/sd-controlnet-canny") == ("sd-controlnet-canny", "lllyasviel/sd-controlnet-canny")
    assert parse("/m/control_v11p_sd15_canny.safetensors/") == ("control_v11p_sd15_canny",
                                                                "/m/control_v11p_sd15_canny.safetensors/")
    assert parse("my canny=./net") == ("net", "my canny=./net")     # not NAME=: a path holding '='
    for bad in ("nets/my canny", "canny="):
        with pytest.raises(ExportError, match="NAME"):
            parse(bad)


def test_controlnet_sources(tiny_model_dir, controlnet_dirs, tmp_path):
    """A single file (diffusers keys, or the original layout in a .ckpt) loads with a config derived from the base
    UNet, offline, to the diffusers ControlNet's weights; misfits are refused."""
    from safetensors.torch import load_file, save_file

    from ..exporters.ldm import controlnet_to_ldm
    state = load_file(controlnet_dirs["canny"] / "diffusion_pytorch_model.safetensors")
    save_file(state, tmp_path / "control_tiny.safetensors")
    source = load_source(str(tiny_model_dir), progress=False)
    nets = load_controlnets((str(tmp_path / "control_tiny.safetensors"),), source, progress=False)
    assert list(nets) == ["control_tiny"]
    assert all(torch.equal(nets["control_tiny"].state_dict()[k], v) for k, v in state.items())
    ldm = controlnet_to_ldm(state, diffusers.ControlNetModel.load_config(controlnet_dirs["canny"]))
    torch.save({"state_dict": ldm}, tmp_path / "control_ldm.ckpt")          # the original layout (control_model.*)
    net = load_controlnets((str(tmp_path / "control_ldm.ckpt"),), source, progress=False)["control_ldm"]
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    save_file({k: v.half() for k, v in ldm.items()}, tmp_path / "control_half.safetensors")  # as released files are
    net = load_controlnets((str(tmp_path / "control_half.safetensors"),), source, progress=False)["control_half"]
    assert all(v.dtype == torch.float32 for v in net.state_dict().values())                # traced like the UNet
    assert all(torch.equal(net.state_dict()[k], v.half().float()) for k, v in state.items())
    config = {**nets["control_tiny"].config, "cross_attention_dim": 16}       # like SD 2.x's 1024 against 768
    diffusers.ControlNetModel.from_config(config).save_pretrained(tmp_path / "sd2-net")
    (tmp_path / "empty").mkdir()
    for arguments, words in (((str(tmp_path / "sd2-net"),), "does not fit .* cross_attention_dim 16 vs 32"),
                             ((str(tmp_path / "empty"),), "no config.json"),
                             ((f"a={tmp_path / 'empty'}", f"a={tmp_path / 'sd2-net'}"), "given twice"),
                             ((str(tmp_path / "missing.ckpt"),), "no such ControlNet checkpoint")):
        with pytest.raises(ExportError, match=words):
            load_controlnets(arguments, source, progress=False)


# -- parity with diffusers -------------------------------------------------------------------------------

def test_txt2img(pipe, tiny_model_dir, diffusers_nets, control_images):
    ours = generate(pipe, [Control(image=control_images["canny"], model="canny")])
    theirs = reference(tiny_model_dir, "StableDiffusionControlNetPipeline", [diffusers_nets["canny"]], "Euler a", 3,
                       image=control_images["canny"])
    compare("controlnet[txt2img]", ours, theirs)
    assert ('ControlNet 0: "Module: none, Model: canny, Weight: 1.0, Resize Mode: Crop and Resize, '
            'Guidance Start: 0.0, Guidance End: 1.0, Control Mode: Balanced"') in ours.infotexts[0]
    plain = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, seed=3)
    assert np.abs(pixels(plain) - theirs).max() > 20            # the ControlNet visibly steers the image


def test_guess_mode_batch_of_two(pipe, tiny_model_dir, diffusers_nets, control_images):
    """A1111's "ControlNet is more important" is diffusers' guess_mode: soft weights, conditional batch only."""
    unit = Control(image=control_images["canny"], model="canny", scale=0.8, control_mode="ControlNet is more important")
    ours = generate(pipe, [unit], sampler="DPM++ 2M", seed=5, batch_size=2)
    theirs = reference(tiny_model_dir, "StableDiffusionControlNetPipeline", [diffusers_nets["canny"]], "DPM++ 2M", 5,
                       batch_size=2, image=control_images["canny"], guess_mode=True,
                       controlnet_conditioning_scale=0.8)
    compare("controlnet[guess_mode batch 2]", ours, theirs)


def test_my_prompt_is_more_important(pipe, tiny_model_dir, diffusers_nets, control_images, monkeypatch):
    """Soft weights on both batches: diffusers' ControlNet with its guess-mode scaling, guidance as usual."""
    net = diffusers_nets["canny"]
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda *a, **k: forward(*a, **{**k, "guess_mode": True}))
    ours = generate(pipe, [Control(image=control_images["canny"], model="canny", control_mode=1)], seed=6)
    theirs = reference(tiny_model_dir, "StableDiffusionControlNetPipeline", [net], "Euler a", 6,
                       image=control_images["canny"])
    compare("controlnet[my prompt is more important]", ours, theirs)


def test_start_end_and_scale(pipe, tiny_model_dir, diffusers_nets, control_images, sampler="Heun"):
    """Heun evaluates the model twice per step: start/end count evaluations, as diffusers' loop does."""
    ours = generate(pipe, [Control(image=control_images["canny"], model="canny", scale=0.7, start=0.2, end=0.7)],
                    sampler=sampler, seed=7)
    theirs = reference(tiny_model_dir, "StableDiffusionControlNetPipeline", [diffusers_nets["canny"]], sampler, 7,
                       image=control_images["canny"], controlnet_conditioning_scale=0.7,
                       control_guidance_start=0.2, control_guidance_end=0.7)
    compare(f"controlnet[start/end {sampler}]", ours, theirs)


def test_two_controlnets(pipe, tiny_model_dir, diffusers_nets, control_images):
    units = [Control(image=control_images["canny"], model="canny", scale=0.6, end=0.8),
             Control(image=control_images["depth"], model="depth", scale=1.2, start=0.3)]
    ours = generate(pipe, units, sampler="Euler", seed=9)
    theirs = reference(tiny_model_dir, "StableDiffusionControlNetPipeline",
                       [diffusers_nets["canny"], diffusers_nets["depth"]], "Euler", 9,
                       image=[control_images["canny"], control_images["depth"]],
                       controlnet_conditioning_scale=[0.6, 1.2], control_guidance_start=[0.0, 0.3],
                       control_guidance_end=[0.8, 1.0])
    compare("controlnet[multi]", ours, theirs)


def test_img2img(pipe, tiny_model_dir, diffusers_nets, control_images, init_image):
    ours = generate(pipe, [Control(image=control_images["depth"], model="depth")], task="img2img",
                    images=(init_image,), strength=0.6, seed=11)
    theirs = reference(tiny_model_dir, "StableDiffusionControlNetImg2ImgPipeline", [diffusers_nets["depth"]],
                       "Euler a", 11, image=init_image, control_image=control_images["depth"], strength=0.6)
    compare("controlnet[img2img]", ours, theirs)


def test_inpaint_4_channel(pipe, tiny_model_dir, diffusers_nets, control_images, init_image, mask_image):
    ours = generate(pipe, [Control(image=control_images["canny"], model="canny")], sampler="DDIM",
                    task="inpaint", images=(init_image, mask_image), seed=13)
    theirs = reference(tiny_model_dir, "StableDiffusionControlNetInpaintPipeline", [diffusers_nets["canny"]],
                       "DDIM", 13, image=init_image, mask_image=mask_image, control_image=control_images["canny"])
    compare("controlnet[inpaint4]", ours, theirs)


def test_inpaint_9_channel(inpaint_control_export, tiny_inpaint_model_dir, diffusers_nets, control_images,
                           init_image, mask_image):
    p = sdrt.load(inpaint_control_export, runtime=RUNTIME, progress=False)
    ours = generate(p, [Control(image=control_images["canny"], model="canny", start=0.1)],
                    task="inpaint", images=(init_image, mask_image), seed=15)
    theirs = reference(tiny_inpaint_model_dir, "StableDiffusionControlNetInpaintPipeline", [diffusers_nets["canny"]],
                       "Euler a", 15, image=init_image, mask_image=mask_image, control_image=control_images["canny"],
                       control_guidance_start=0.1)
    compare("controlnet[inpaint9]", ours, theirs)


class Recorder:
    """A fake Runtime: records its feeds, answers ones of the spec's output shapes."""

    def __init__(self, spec, dims):
        self.spec, self.dims, self.feeds = spec, dims, []

    def run(self, feeds):
        self.feeds.append(feeds)
        sizes = dict(self.dims, B=len(feeds["sample"]))
        return {t.name: np.ones(t.resolve(sizes), np.float32) for t in self.spec.outputs}


def test_evaluations_split_into_runs():
    """ModelDenoiser runs an evaluation in two calls when the negative prompt has another token count: start/end
    follow the evaluation index the denoiser reports, and a conditional-only unit skips the negative prompt's
    run."""
    from sdrt.pipelines.control import ControlledUnet, Unit
    layout = tuple(map(tuple, TINY_LAYOUT))
    dims = dict(H=SIZE, W=SIZE, C=4, CI=4, D=32, S=77)
    plain, unet = Recorder(specs.UNET, dims), Recorder(specs.unet_control(layout), dims)
    net = Recorder(specs.controlnet(layout), dims)
    soft = np.logspace(-1, 0, len(layout)).astype(np.float32)
    unit = Unit(net, np.zeros((1, 3, SIZE, SIZE), np.float32), 1.0, 0.5, 1.0, soft, cond_only=True)
    evaluation = [0]
    controlled = ControlledUnet(unet, plain, [unit], calls=4, batch=2, guidance=True, latent_channels=4,
                                evaluation=lambda: evaluation[0])
    x = np.random.default_rng(0).standard_normal((4, 2, 4, 8, 8)).astype(np.float32)
    for i, t in enumerate((900.0, 600.0, 600.0, 100.0)):        # evaluations 1 and 2 share a timestep
        evaluation[0] = i
        for tokens in (154, 77):                                  # negative prompt's run, then the prompt's
            controlled.run({"sample": x[i], "timestep": np.full(2, t, np.float32),
                            "encoder_hidden_states": np.zeros((2, tokens, 32), np.float32)})
    assert len(plain.feeds) == 6 and len(unet.feeds) == 2          # active from evaluation 2 of 4, prompt's runs
    assert [f["encoder_hidden_states"].shape[1] for f in unet.feeds] == [77, 77]
    for feeds in unet.feeds:
        assert [float(feeds[t.name].max()) for t in unet.spec.inputs[3:]] == pytest.approx(soft.tolist())


# -- control maps ---------------------------------------------------------------------------------------

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (90, 90, 90)


def test_canny_edges_of_a_square():
    x = np.zeros((32, 32, 3), np.uint8)
    x[8:24, 8:24] = 255
    unit = Control(image=x, model="m", preprocessor="canny")
    edges = control_map(unit, 32, 32)[0]
    assert set(np.unique(edges)) == {0.0, 1.0} and (edges[0] == edges[1]).all() and (edges[0] == edges[2]).all()
    rows, cols = np.nonzero(edges[0])
    inside = lambda lo, hi: (rows >= lo) & (rows <= hi) & (cols >= lo) & (cols <= hi)   # noqa: E731
    assert (inside(7, 24) & ~inside(9, 22)).all()                 # within a pixel of the outline, nothing else
    for side in (rows == 7, rows == 23, cols == 7, cols == 23):
        assert side.sum() >= 14                                   # every side found (corners are rounded)


def test_canny_thresholds():
    x = np.zeros((32, 32, 3), np.uint8)
    x[8:24, 8:24] = 20                                            # Sobel |g| 80 on the sides, < 100
    assert control_map(Control(image=x, model="m", preprocessor="canny"), 32, 32).max() == 0
    found = control_map(Control(image=x, model="m", preprocessor="canny", low_threshold=20, high_threshold=50), 32, 32)
    assert found[0, 0, 12, 12] == 0 and found[0, 0, 7, 12] == 1.0


def test_resize_modes():
    """A grey 64x128 (h x w) map with a red and a blue 48x32 block side by side in its middle, fitted to 64x64
    (three colours: nearest-neighbour, so every pixel is known)."""
    x = np.tile(np.array(GREY, np.uint8), (64, 128, 1))
    x[8:56, 32:64], x[8:56, 64:96] = RED, BLUE
    crop = resize(x, 64, 64, "Crop and Resize")                   # scale 1, the middle 64 columns
    assert crop.shape == (64, 64, 3)
    assert (crop[8:56, :32] == RED).all() and (crop[8:56, 32:] == BLUE).all()
    assert (crop[:8] == GREY).all() and (crop[56:] == GREY).all()
    just = resize(x, 64, 64, "Just Resize")                       # squeezed to half the width
    assert (just[8:56, 16:32] == RED).all() and (just[8:56, 32:48] == BLUE).all()
    assert (just[:, :16] == GREY).all() and (just[:, 48:] == GREY).all() and (just[:8] == GREY).all()
    fill = resize(x, 64, 64, "Resize and Fill")                   # halved to 32x64, centred on the border median
    assert (fill[20:44, 16:32] == RED).all() and (fill[20:44, 32:48] == BLUE).all()
    assert (fill[:20] == GREY).all() and (fill[44:] == GREY).all() and (fill[:, :16] == GREY).all()
    assert (resize(x, 256, 128, "Crop and Resize")[16:112, 64:128] == RED).all()    # upscaling by 2


def test_resize_keeps_edge_maps_binary():
    x = np.zeros((48, 48, 3), np.uint8)
    x[::6] = 255
    y = resize(x, 64, 64, "Just Resize")
    assert y.shape == (64, 64, 3) and set(np.unique(y)) <= {0, 255} and y.max() == 255


def test_control_map_is_rgb_in_unit_range_and_alpha_over_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255                                          # top half opaque red, bottom transparent
    m = control_map(Control(image=Image.fromarray(rgba), model="m", resize_mode="Just Resize"), 8, 8)
    assert m.shape == (1, 3, 8, 8) and m.dtype == np.float32
    assert np.allclose(m[0, :, 0, 0], [200 / 255, 0, 0]) and np.allclose(m[0, :, 7, 0], 1.0)


# -- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(image="edges.png"), "PIL image"),
    (dict(image=np.zeros((8, 8), np.float32)), "uint8"),
    (dict(scale=-1), "scale"),
    (dict(scale=float("nan")), "scale"),
    (dict(start=0.5, end=0.5), "start"),
    (dict(end=1.5), "start"),
    (dict(preprocessor="depth_midas"), "none, canny"),
    (dict(resize_mode="Stretch"), "Crop and Resize"),
    (dict(control_mode=5), "Balanced"),
    (dict(model=""), "model"),
])
def test_bad_units(kwargs, words):
    with pytest.raises(InvalidRequest, match=words):
        Control(**{"image": np.zeros((8, 8, 3), np.uint8), "model": "canny", **kwargs})


def test_other_preprocessors_with_their_output():
    unit = Control(image=np.zeros((SIZE, SIZE), np.uint8), model="depth", preprocessor="depth_midas", processed=True)
    assert unit.preprocessor == "depth_midas" and unit.image.shape == (SIZE, SIZE, 3)


def test_bad_requests(pipe, tiny_export):
    unit = Control(image=np.zeros((SIZE, SIZE, 3), np.uint8), model="openpose")
    with pytest.raises(InvalidRequest, match="'openpose' is not in this export; it has: canny, depth"):
        pipe.txt2img(PROMPT, width=SIZE, height=SIZE, steps=2, control=[unit])
    with pytest.raises(InvalidRequest, match="sdrt.Control"):
        pipe.txt2img(PROMPT, width=SIZE, height=SIZE, steps=2, control=[{"model": "canny"}])
    plain = sdrt.load(tiny_export, runtime=RUNTIME, progress=False)
    with pytest.raises(InvalidRequest, match="--controlnet"):
        plain.txt2img(PROMPT, width=SIZE, height=SIZE, steps=2, control=[unit])


def test_controlnet_with_a_lora_matches_diffusers(control_export, tiny_model_dir, diffusers_nets, control_images,
                                                  tmp_path):
    """The residual UNet follows the UNet's LoRAs: with start 0.4 the first evaluations run the plain UNet,
    the later ones the residual UNet, and both must carry the LoRA to match diffusers."""
    pytest.importorskip("peft")
    from tests.test_lora import kohya_lora
    base = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                             requires_safety_checker=False)
    kohya_lora(tmp_path / "fox.safetensors", base, seed=1, rank=4, alpha=2.0)
    base.load_lora_weights(str(tmp_path / "fox.safetensors"), adapter_name="fox")
    base.set_adapters(["fox"], adapter_weights=[0.9])
    p = sdrt.load(control_export, runtime=RUNTIME, progress=False)
    unit = Control(image=control_images["canny"], model="canny", start=0.4)
    generate(p, [unit], steps=2)                              # the residual UNet is loaded before the LoRA
    p.set_loras([(tmp_path / "fox.safetensors", 0.9)])
    ours = generate(p, [unit])
    theirs = reference(tiny_model_dir, "StableDiffusionControlNetPipeline", [diffusers_nets["canny"]], "Euler a", 3,
                       base=base, image=control_images["canny"], control_guidance_start=0.4)
    compare("controlnet[with LoRA]", ours, theirs)
    without = reference(tiny_model_dir, "StableDiffusionControlNetPipeline", [diffusers_nets["canny"]], "Euler a",
                        3, image=control_images["canny"], control_guidance_start=0.4)
    assert np.abs(pixels(ours) - without).max() > 8             # the LoRA matters here


# -- command line ----------------------------------------------------------------------------------------

def test_cli_generate_with_two_units(pipe, control_export, control_images, tmp_path, capsys):
    control_images["canny"].save(tmp_path / "photo.png")
    control_images["depth"].resize((48, 80)).save(tmp_path / "depth.png")
    args = ["generate", str(control_export), "--prompt", PROMPT, "--width", str(SIZE), "--height", str(SIZE),
            "--steps", "3", "--seed", "4", "--runtime", RUNTIME, "--output", str(tmp_path / "out.png"),
            "--control-image", str(tmp_path / "photo.png"), "--controlnet", "canny", "--control-preprocessor", "canny",
            "--control-image", str(tmp_path / "depth.png"), "--controlnet", "depth", "--control-preprocessor", "none",
            "--control-resize", "Just Resize",
            "--control-scale", "0.5", "--control-scale", "1.5", "--control-mode", "ControlNet is more important"]
    assert main(args) == 0
    units = [Control(image=control_images["canny"], model="canny", preprocessor="canny", scale=0.5,
                     resize_mode="Just Resize", control_mode=2),
             Control(image=control_images["depth"].resize((48, 80)), model="depth", scale=1.5,
                     resize_mode="Just Resize", control_mode=2)]
    expected = pipe.txt2img(PROMPT, width=SIZE, height=SIZE, steps=3, seed=4, control=units)
    assert (pixels(expected)[0] == np.asarray(Image.open(tmp_path / "out.png"))).all()
    capsys.readouterr()
    assert main(args + ["--controlnet", "depth"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sdrt generate: error: give one --controlnet NAME per --control-image (2 images, 3 ControlNets)"]


def test_cli_export_passes_controlnets(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_export(model, out, options):
        seen["options"] = options
        return mf.Manifest(source=model, architecture={}, components={"unet": None}, controlnets={"canny": None})
    monkeypatch.setattr("sdrt.exporters.export", fake_export)
    assert main(["export", "m", str(tmp_path / "o"), "--controlnet", "canny=a/b", "--controlnet", "./c"]) == 0
    assert seen["options"].controlnets == ("canny=a/b", "./c")
    assert "ControlNets: canny" in capsys.readouterr().out


def test_only_masked_crops_the_control_image(pipe, control_images, init_image, mask_image):
    """"Only masked": a control image the size of the picture is cropped to the inpainted region, so the
    result is the inpaint of the region with the cropped map, pasted back."""
    from sdrt.pipelines import images, masking
    edges = np.asarray(control_images["canny"])
    kw = dict(steps=2, seed=4, strength=0.7, width=32, height=32)
    ours = pipe.inpaint(init_image, mask_image, PROMPT, only_masked=True, padding=2,
                        control=[Control(image=edges, model="canny")], **kw)
    box = masking.expand_crop_region(masking.crop_region(mask_image, 2), 32, 32, SIZE, SIZE)
    x1, y1, x2, y2 = box
    region = pipe.inpaint(*(images.resize_image(im.crop(box), 2, 32, 32) for im in (init_image, mask_image)),
                          PROMPT, control=[Control(image=edges[y1:y2, x1:x2], model="canny")], **kw)
    assert np.array_equal(np.asarray(ours[0]), np.asarray(masking.paste(region[0], init_image, mask_image, box)))
