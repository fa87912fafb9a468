"""SDXL ControlNet: export of SDXL ControlNets (text_time added conditioning) with the residual-taking SDXL UNet,
and image parity with diffusers' StableDiffusionXLControlNetPipeline on a tiny random SDXL.

Reference: diffusers' StableDiffusionXLControlNet{,Img2Img,Inpaint}Pipeline (MultiControlNet for several units,
control_guidance_start/end, guess_mode, a PEFT LoRA) over the same tiny SDXL folder and random-weight ControlNets
copied from its UNet (sdrt exports one of them from a single file in the original ControlNet layout), CPU
generators seeded like sdrt. OpenVINO, the CLI and the A1111 server (webuiapi client)
are held to the Python API on ONNX Runtime.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt import manifest as mf
from sdrt import specs
from sdrt.pipelines import samplers
from sdrt.pipelines.control import Control

from ..conftest import random_controlnet
from .test_parity import pixels
from .test_sdxl import NEGATIVE, PROMPT, SIZE, STEPS, _export, compare, diffusers_pipe

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("cv2")

TINY_XL_LAYOUT = [[32, 1], [32, 1], [32, 1], [32, 2], [64, 2], [64, 2], [64, 2]]


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    """test_sdxl's tiny SDXL (same architecture and seed)."""
    from sdrt.exporters.random_model import build_random_model
    return build_random_model(tmp_path_factory.mktemp("sdxl") / "model", "tiny-sdxl", seed=4)


@pytest.fixture(scope="module")
def xl_nets(tmp_path_factory, xl_dir):
    root = tmp_path_factory.mktemp("sdxl_controlnets")
    return {name: random_controlnet(xl_dir, root / name, seed) for name, seed in (("canny", 7), ("depth", 8))}


@pytest.fixture(scope="module")
def xl_canny_file(tmp_path_factory, xl_nets):
    """The canny ControlNet as a single file in the original ControlNet layout (``control_model.*``, SDXL's
    ``label_emb``, ``input_hint_block``, ``zero_convs``, ``middle_block_out``)."""
    from safetensors.torch import load_file, save_file

    from ..exporters.ldm import controlnet_to_ldm
    config = diffusers.ControlNetModel.load_config(xl_nets["canny"])
    state = controlnet_to_ldm(load_file(xl_nets["canny"] / "diffusion_pytorch_model.safetensors"), config)
    path = tmp_path_factory.mktemp("sdxl_controlnet_file") / "control_canny_xl.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def xl_control_export(tmp_path_factory, xl_dir, xl_nets, xl_canny_file):
    """Every graph parity-checked against torch, the ControlNets and residual UNet included. 'canny' comes from
    its original-layout single file, 'depth' from its diffusers folder; the images are held to diffusers' pipeline
    with the diffusers folders of both."""
    nets = (f"canny={xl_canny_file}", f"depth={xl_nets['depth']}")
    return _export(tmp_path_factory, xl_dir, "sdxl_control_export", controlnets=nets)


@pytest.fixture(scope="module")
def xl_pipe(xl_control_export):
    return sdrt.load(xl_control_export, runtime="onnxruntime", progress=False)


@pytest.fixture(scope="module")
def maps():
    rng = np.random.default_rng(4)
    lines = np.zeros((SIZE, SIZE, 3), np.uint8)
    lines[:, ::7] = 255
    return {"canny": Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)),
            "depth": Image.fromarray(lines)}


def reference(xl_dir, xl_nets, names, sampler, seed, batch_size=1, task="", **kwargs) -> np.ndarray:
    base = diffusers_pipe(xl_dir, "StableDiffusionXLPipeline")[0]
    nets = [diffusers.ControlNetModel.from_pretrained(xl_nets[n]) for n in names]
    cls = getattr(diffusers, f"StableDiffusionXLControlNet{task}Pipeline")
    pipe = cls.from_pipe(base, controlnet=nets[0] if len(nets) == 1 else nets)
    cls, extra = samplers.DIFFUSERS_EQUIVALENT[sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(base.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch_size)]
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                   generator=gens, num_images_per_prompt=batch_size, height=SIZE, width=SIZE, output_type="np",
                   **kwargs).images
    return (out * 255).round().astype(np.int16)


def generate(pipe, units, sampler="Euler a", seed=3, **kwargs):
    return pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, sampler=sampler,
                        seed=seed, control=units, **kwargs)


def test_export_writes_sdxl_control_graphs(xl_control_export):
    manifest = mf.read(xl_control_export)
    assert manifest.architecture["control_residuals"] == TINY_XL_LAYOUT
    assert manifest.unet_control.spec == "unet_control_sdxl"
    assert {n: c.spec for n, c in manifest.controlnets.items()} == {"canny": "controlnet_sdxl",
                                                                    "depth": "controlnet_sdxl"}
    graphs = [(c, specs.spec_for(c, manifest.architecture)) for c in (manifest.unet_control,
                                                                       *manifest.controlnets.values())]
    for component, spec in graphs:
        session = ort.InferenceSession(str(xl_control_export / component.file), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [t.name for t in spec.inputs]
        assert [o.name for o in session.get_outputs()] == [t.name for t in spec.outputs]
    assert {"text_embeds", "time_ids"} <= {t.name for t in graphs[1][1].inputs}


def test_txt2img(xl_pipe, xl_dir, xl_nets, maps):
    ours = generate(xl_pipe, [Control(image=maps["canny"], model="canny")])
    theirs = reference(xl_dir, xl_nets, ["canny"], "Euler a", 3, image=maps["canny"])
    compare("sdxl controlnet[txt2img]", ours, theirs)
    plain = xl_pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, seed=3)
    assert np.abs(pixels(plain) - theirs).max() > 20                 # the ControlNet visibly steers the image


def test_two_controlnets_scale_start_end(xl_pipe, xl_dir, xl_nets, maps):
    units = [Control(image=maps["canny"], model="canny", scale=0.6, end=0.8),
             Control(image=maps["depth"], model="depth", scale=1.3, start=0.3)]
    ours = generate(xl_pipe, units, sampler="Euler", seed=5)
    theirs = reference(xl_dir, xl_nets, ["canny", "depth"], "Euler", 5, image=[maps["canny"], maps["depth"]],
                       controlnet_conditioning_scale=[0.6, 1.3], control_guidance_start=[0.0, 0.3],
                       control_guidance_end=[0.8, 1.0])
    compare("sdxl controlnet[multi, start/end]", ours, theirs)


def test_guess_mode_batch_of_two(xl_pipe, xl_dir, xl_nets, maps):
    """"ControlNet is more important" (diffusers' guess_mode): the conditional rows only, their text_embeds and
    time_ids included."""
    unit = Control(image=maps["depth"], model="depth", scale=0.8, control_mode="ControlNet is more important")
    ours = generate(xl_pipe, [unit], seed=7, batch_size=2)
    theirs = reference(xl_dir, xl_nets, ["depth"], "Euler a", 7, batch_size=2, image=maps["depth"], guess_mode=True,
                       controlnet_conditioning_scale=0.8)
    compare("sdxl controlnet[guess_mode batch 2]", ours, theirs)


def test_img2img_and_inpaint(xl_pipe, xl_dir, xl_nets, maps):
    rng = np.random.default_rng(5)
    init = Image.fromarray(rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3)).astype(np.uint8)).resize((SIZE, SIZE))
    mask = Image.new("L", (SIZE, SIZE))
    mask.paste(255, (8, 16, 40, 48))
    unit = [Control(image=maps["canny"], model="canny")]
    ours = xl_pipe.img2img(init, PROMPT, negative_prompt=NEGATIVE, strength=0.6, steps=STEPS, seed=11, control=unit)
    theirs = reference(xl_dir, xl_nets, ["canny"], "Euler a", 11, task="Img2Img", image=init,
                       control_image=maps["canny"], strength=0.6, controlnet_conditioning_scale=1.0)
    compare("sdxl controlnet[img2img]", ours, theirs)
    ours = xl_pipe.inpaint(init, mask, PROMPT, negative_prompt=NEGATIVE, strength=0.7, steps=STEPS, seed=13,
                           control=unit)
    theirs = reference(xl_dir, xl_nets, ["canny"], "Euler a", 13, task="Inpaint", image=init, mask_image=mask,
                       control_image=maps["canny"], strength=0.7, controlnet_conditioning_scale=1.0)
    compare("sdxl controlnet[inpaint4]", ours, theirs)


def test_openvino_gives_the_onnxruntime_image(xl_pipe, xl_control_export, maps):
    pytest.importorskip("openvino")
    ov = sdrt.load(xl_control_export, runtime="openvino", progress=False)
    units = [Control(image=maps["canny"], model="canny", scale=0.9, start=0.2)]
    assert np.abs(pixels(generate(ov, units, seed=9)) - pixels(generate(xl_pipe, units, seed=9))).max() <= 1


def test_single_file_and_misfits(xl_dir, xl_nets, xl_canny_file, controlnet_dirs, tmp_path):
    """A single-file SDXL ControlNet, in diffusers' or the original layout, loads with its config derived from the
    SDXL UNet (offline), every weight the diffusers ControlNet's; an SD 1.x ControlNet is refused on SDXL, and so is
    a file that lacks weights (diffusers' own conversion drops label_emb) or is cut short."""
    from safetensors.torch import load_file, save_file

    from sdrt.errors import ExportError
    from sdrt.exporters.controlnet import load_controlnets
    from sdrt.exporters.sources import load_source
    state = load_file(xl_nets["canny"] / "diffusion_pytorch_model.safetensors")
    save_file(state, tmp_path / "xl_canny.safetensors")
    source = load_source(str(xl_dir), progress=False)
    net = load_controlnets((str(tmp_path / "xl_canny.safetensors"),), source, progress=False)["xl_canny"]
    assert net.config.addition_embed_type == "text_time"
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ExportError, match="does not fit .*cross_attention_dim 32 vs 80.*addition_embed_type None"):
        load_controlnets((str(controlnet_dirs["canny"]),), source, progress=False)
    net = load_controlnets((str(xl_canny_file),), source, progress=False)["control_canny_xl"]
    original = diffusers.ControlNetModel.from_pretrained(xl_nets["canny"]).state_dict()
    assert net.state_dict().keys() == original.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in original.items())
    ldm = load_file(xl_canny_file)
    save_file({k: v for k, v in ldm.items() if ".label_emb." not in k}, tmp_path / "no_label_emb.safetensors")
    data = xl_canny_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    for file, words in (("no_label_emb", "4 weights missing .add_embedding.linear_1.bias, add_embedding"),
                        ("cut", "not a readable checkpoint .* check the file is complete")):
        with pytest.raises(ExportError, match=words):
            load_controlnets((str(tmp_path / f"{file}.safetensors"),), source, progress=False)


def test_cli_generate(xl_pipe, xl_control_export, maps, tmp_path):
    from sdrt.cli import main
    maps["canny"].save(tmp_path / "map.png")
    assert main(["generate", str(xl_control_export), "--prompt", PROMPT, "--width", str(SIZE), "--height", str(SIZE),
                 "--steps", "3", "--seed", "4", "--runtime", "onnxruntime", "--output", str(tmp_path / "out.png"),
                 "--control-image", str(tmp_path / "map.png"), "--controlnet", "canny", "--control-scale", "0.7"]) == 0
    expected = xl_pipe.txt2img(PROMPT, width=SIZE, height=SIZE, steps=3, seed=4,
                               control=[Control(image=maps["canny"], model="canny", scale=0.7)])
    assert (pixels(expected)[0] == np.asarray(Image.open(tmp_path / "out.png"))).all()


def test_server_controlnet_unit(xl_pipe, xl_control_export, maps):
    """sd-webui-controlnet's always-on script through the A1111 client (webuiapi) on the SDXL export: the image of
    the Python API, the model found by its A1111-style name."""
    webuiapi = pytest.importorskip("webuiapi")
    pytest.importorskip("uvicorn")
    from sdrt.server import ServerOptions, create_app

    from ..server.test_server import load, running
    options = ServerOptions(folders=(xl_control_export,), runtime="onnxruntime")
    with running(create_app(options, load)) as port:
        api = webuiapi.WebUIApi(port=port, sampler="Euler a", steps=3)
        assert [t.split(" [")[0] for t in api.controlnet_model_list()] == ["canny", "depth"]
        unit = webuiapi.ControlNetUnit(image=maps["depth"], module="none", model="diffusers_xl_depth_full",
                                       weight=0.7, guidance_start=0.2, resize_mode="Just Resize")
        r = api.txt2img(prompt=PROMPT, seed=12, width=SIZE, height=SIZE, steps=3, cfg_scale=7.0,
                        controlnet_units=[unit], alwayson_scripts={})
    expected = xl_pipe.txt2img(PROMPT, seed=12, width=SIZE, height=SIZE, steps=3, guidance_scale=7.0,
                               control=[Control(image=maps["depth"], model="depth", scale=0.7, start=0.2,
                                                resize_mode="Just Resize")])
    assert np.array_equal(np.asarray(r.images[0].convert("RGB"), np.int16), pixels(expected)[0])


def test_tensorrt_profiles_of_the_sdxl_control_graphs(xl_control_export):
    """TensorRT builds (no GPU needed for the profiles): the SDXL ControlNets and residual UNet get their own specs,
    text_embeds and time_ids rows as the UNet's, and every residual a ControlNet gives is what the UNet takes."""
    from sdrt.runtimes import trt_build
    from sdrt.runtimes.builds import BuildOptions
    manifest = mf.read(xl_control_export)
    options = BuildOptions(backend="tensorrt", static=(SIZE, SIZE), batch=2)
    p = trt_build.settings(manifest, options, trt_build.Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0)))["profiles"]
    graphs = trt_build.graphs(manifest)
    assert graphs["unet_control"][1].name == "unet_control_sdxl" and graphs["controlnet/canny"][1].name == \
        "controlnet_sdxl"
    for name in ("unet", "unet_control", "controlnet/canny", "controlnet/depth"):
        assert p[name]["text_embeds"][0] == [4, 40] and p[name]["time_ids"][0] == [4, 6], name
    net, unet = graphs["controlnet/canny"][1], graphs["unet_control"][1]
    residuals = unet.inputs[len(specs.UNET_SDXL.inputs):]
    assert [p["unet_control"][t.name] for t in residuals] == [[list(t.resolve(dict(B=4, H=SIZE, W=SIZE)))] * 3
                                                              for t in net.outputs]


def test_controlnet_with_a_lora(xl_control_export, xl_dir, xl_nets, maps, tmp_path):
    """The residual SDXL UNet follows the UNet's LoRAs (start 0.4: plain UNet first, residual UNet later): the image
    of diffusers' SDXL ControlNet pipeline with the same PEFT LoRA."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_dir)
    torch.manual_seed(0)
    base.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                                     init_lora_weights="gaussian"), adapter_name="fox")
    for name, p in base.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    base.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(base.unet, adapter_name="fox"),
                           unet_lora_adapter_metadata=base.unet.peft_config["fox"].to_dict())
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pipe(
        base, controlnet=diffusers.ControlNetModel.from_pretrained(xl_nets["canny"]))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, image=maps["canny"], num_inference_steps=STEPS, guidance_scale=7.5,
                   height=SIZE, width=SIZE, control_guidance_start=0.4, output_type="np",
                   generator=[torch.Generator("cpu").manual_seed(14)]).images
    theirs = (out * 255).round().astype(np.int16)
    ours = sdrt.load(xl_control_export, runtime="onnxruntime", progress=False)
    units = [Control(image=maps["canny"], model="canny", start=0.4)]
    assert np.abs(pixels(generate(ours, units, sampler="Euler", seed=14)) - theirs).max() > 10   # the LoRA matters
    ours.set_loras([(tmp_path / "pytorch_lora_weights.safetensors", 1.0)])
    compare("sdxl controlnet[with LoRA]", generate(ours, units, sampler="Euler", seed=14), theirs)
