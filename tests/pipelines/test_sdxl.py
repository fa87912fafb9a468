"""SDXL: export of a tiny random SDXL (base and refiner) and image parity with diffusers' SDXL pipelines.

Reference: diffusers' StableDiffusionXL{,Img2Img}Pipeline on the same tiny model folder, same seed (CPU
generator), same sampler; A1111's prompt syntax against diffusers fed ``prompt_embeds`` built here in torch
the way A1111 builds SDXL conditioning (both encoders per chunk, weighted each on its own, pooled from the
first chunk).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import sdrt
from sdrt import manifest as mf
from sdrt.specs import spec_for

from .conftest import WORST
from .test_parity import TOLERANCE, pixels

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

SIZE, STEPS = 64, 6
PROMPT, NEGATIVE = "a red fox in the snow, photograph", "blurry"


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    from sdrt.exporters.random_model import build_random_model
    return build_random_model(tmp_path_factory.mktemp("sdxl") / "model", "tiny-sdxl", seed=4)


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    from sdrt.exporters.random_model import build_random_model
    return build_random_model(tmp_path_factory.mktemp("sdxl_refiner") / "model", "tiny-sdxl-refiner", seed=5)


def _export(tmp_path_factory, model_dir, name, **options):
    from sdrt.exporters import ExportOptions, export
    out = tmp_path_factory.mktemp(name) / "sdrt"
    export(str(model_dir), out, ExportOptions(**options), progress=False)
    return out


@pytest.fixture(scope="module")
def xl_export(tmp_path_factory, xl_dir):
    return _export(tmp_path_factory, xl_dir, "sdxl_export")      # every component parity-checked against torch


@pytest.fixture(scope="module")
def refiner_export(tmp_path_factory, refiner_dir):
    # no torch parity check: the refiner's image is held to diffusers'
    return _export(tmp_path_factory, refiner_dir, "sdxl_refiner_export", check_parity=False)


@pytest.fixture(scope="module")
def xl(xl_export):
    return sdrt.load(xl_export, runtime="onnxruntime", progress=False)


@pytest.fixture(scope="module")
def refiner(refiner_export):
    return sdrt.load(refiner_export, runtime="onnxruntime", progress=False)


@pytest.fixture(scope="module")
def init_image():
    from PIL import Image
    rng = np.random.default_rng(8)
    base = np.linspace(0, 255, SIZE, dtype=np.float32)
    rgb = np.stack([base[None, :].repeat(SIZE, 0), base[:, None].repeat(SIZE, 1),
                    rng.uniform(0, 255, (SIZE, SIZE))], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


PIPES: dict = {}        # (folder, pipeline class) -> the loaded diffusers pipeline, its own scheduler config


def diffusers_pipe(folder, pipeline_cls):
    if (folder, pipeline_cls) not in PIPES:
        pipe = getattr(diffusers, pipeline_cls).from_pretrained(folder)
        PIPES[folder, pipeline_cls] = pipe, dict(pipe.scheduler.config)
    return PIPES[folder, pipeline_cls]


def reference(folder, pipeline_cls, seed, sampler="Euler a", **kwargs) -> np.ndarray:
    from sdrt.pipelines import samplers
    pipe, config = diffusers_pipe(folder, pipeline_cls)
    cls, extra = samplers.DIFFUSERS_EQUIVALENT[sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(config, **extra)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, **kwargs}
    with torch.no_grad():
        out = pipe(num_inference_steps=STEPS, guidance_scale=7.5, generator=[torch.Generator("cpu").manual_seed(seed)],
                   output_type="np", **kwargs).images
    return (out * 255).round().astype(np.int16)


def compare(name, ours, theirs):
    diff = int(np.abs(pixels(ours) - theirs).max())
    WORST[name] = diff
    assert diff <= TOLERANCE, f"{name}: max pixel difference {diff}/255 > {TOLERANCE}"


def test_export_writes_both_text_encoders_and_the_sdxl_unet(xl_export, xl_dir):
    manifest = mf.read(xl_export)
    assert {n: c.spec for n, c in manifest.components.items()} == {
        "text_encoder": "text_encoder_sdxl", "text_encoder_2": "text_encoder_2", "unet": "unet_sdxl",
        "vae_encoder": "vae_encoder", "vae_decoder": "vae_decoder"}
    for component in manifest.components.values():
        spec = spec_for(component, manifest.architecture)
        session = ort.InferenceSession(str(xl_export / component.file), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [t.name for t in spec.inputs]
        assert [o.name for o in session.get_outputs()] == [t.name for t in spec.outputs]
    unet = json.loads((xl_dir / "unet" / "config.json").read_text())
    arch = manifest.architecture
    assert arch["family"] == "sdxl" and arch["hidden_size"] + arch["hidden_size_2"] == unet["cross_attention_dim"]
    assert (arch["addition_time_embed_dim"], arch["time_ids"], arch["text_embeds_dim"]) == (8, 6, 40)
    assert arch["force_upcast"] and arch["force_zeros_for_empty_prompt"] and not arch["requires_aesthetics_score"]
    assert arch["pad_token_id"] == 49407 and arch["pad_token_id_2"] == 0       # tokenizer_2 pads with "!"
    assert (xl_export / "tokenizer_2" / "tokenizer.json").is_file()


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras"])      # every sampler's parity: tests/pipelines/test_parity
def test_txt2img(xl, xl_dir, sampler):
    ours = xl.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, sampler=sampler, seed=3)
    compare(f"sdxl txt2img[{sampler}]", ours,
            reference(xl_dir, "StableDiffusionXLPipeline", 3, sampler, height=SIZE, width=SIZE))


def test_empty_negative_prompt_is_zeros(xl, xl_dir):
    """force_zeros_for_empty_prompt: "" (A1111) is diffusers' zero conditioning without a negative prompt."""
    ours = xl.txt2img(PROMPT, width=SIZE, height=SIZE, steps=STEPS, sampler="Euler", seed=4)
    compare("sdxl txt2img[empty negative]", ours,
            reference(xl_dir, "StableDiffusionXLPipeline", 4, "Euler", negative_prompt=None, height=SIZE, width=SIZE))


def test_size_conditioning(xl, xl_dir):
    sizes = dict(original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(256, 320))
    ours = xl.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=48, steps=STEPS, seed=5, **sizes)
    compare("sdxl txt2img[size conditioning]", ours,
            reference(xl_dir, "StableDiffusionXLPipeline", 5, height=48, width=SIZE, **sizes))
    default = xl.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=48, steps=STEPS, seed=5)
    assert np.abs(pixels(default) - pixels(ours)).max() > TOLERANCE     # the time ids do reach the UNet


def test_request_conditioning_defaults_are_time_ids_defaults():
    """Request restates sdxl.time_ids' defaults (dataclass fields need literals): the two must agree, or a request
    left at its defaults would count as conditioned (and be refused on a base model for its aesthetic scores)."""
    import dataclasses

    from sdrt.pipelines import sdxl
    from sdrt.pipelines.pipeline import Request
    fields = {f.name: f.default for f in dataclasses.fields(Request)}
    assert {k: fields[k] for k in sdxl.CONDITIONING_DEFAULTS} == sdxl.CONDITIONING_DEFAULTS
    assert Request(prompt="a").sdxl_conditioning == {}


def test_size_conditioning_from_the_cli(xl_export, xl_dir, tmp_path, capsys):
    """`sdrt generate` flags (WxH sizes, X,Y corners) reach diffusers' (height, width) / (top, left) arguments,
    the negative prompt's own included."""
    from PIL import Image

    from sdrt.cli import main
    out = tmp_path / "xl.png"
    assert main(["generate", str(xl_export), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--width", "64",
                 "--height", "48", "--steps", str(STEPS), "--seed", "17", "--runtime", "onnxruntime",
                 "--original-size", "384x512", "--crop-top-left", "8,16", "--target-size", "320x256",
                 "--negative-original-size", "256x200", "--negative-crop-top-left", "0,24",
                 "--negative-target-size", "128x128", "--output", str(out)]) == 0
    ours = np.asarray(Image.open(out), dtype=np.int16)[None]
    theirs = reference(xl_dir, "StableDiffusionXLPipeline", 17, height=48, width=SIZE, original_size=(512, 384),
                       crops_coords_top_left=(16, 8), target_size=(256, 320), negative_original_size=(200, 256),
                       negative_crops_coords_top_left=(24, 0), negative_target_size=(128, 128))
    diff = int(np.abs(ours - theirs).max())
    WORST["sdxl txt2img[size conditioning, CLI]"] = diff
    assert diff <= TOLERANCE
    same_negative = reference(xl_dir, "StableDiffusionXLPipeline", 17, height=48, width=SIZE, original_size=(512, 384),
                              crops_coords_top_left=(16, 8), target_size=(256, 320))
    assert np.abs(ours - same_negative).max() > TOLERANCE       # the negative time ids do reach the UNet


def test_refiner_size_conditioning(refiner, refiner_dir, init_image):
    sizes = dict(original_size=(300, 200), crops_coords_top_left=(12, 4), negative_original_size=(128, 96),
                 negative_crops_coords_top_left=(0, 20), aesthetic_score=8.5, negative_aesthetic_score=1.0)
    ours = refiner.img2img(init_image, PROMPT, negative_prompt=NEGATIVE, strength=0.5, steps=STEPS, seed=18, **sizes)
    compare("sdxl refiner img2img[size conditioning]", ours,
            reference(refiner_dir, "StableDiffusionXLImg2ImgPipeline", 18, image=init_image, strength=0.5, **sizes))


def test_size_conditioning_errors(xl, refiner, tiny_export, tmp_path, capsys):
    from sdrt.cli import main
    from sdrt.errors import InvalidRequest
    kwargs = dict(width=SIZE, height=SIZE, steps=1)
    with pytest.raises(InvalidRequest, match="refiner takes no target size"):
        refiner.txt2img(PROMPT, target_size=(64, 64), **kwargs)
    with pytest.raises(InvalidRequest, match="condition the SDXL refiner only"):
        xl.txt2img(PROMPT, aesthetic_score=7.0, **kwargs)
    with pytest.raises(InvalidRequest, match=r"original_size must be a pair of numbers"):
        xl.txt2img(PROMPT, original_size=(64,), **kwargs)
    args = ["generate", str(tiny_export), "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1",
            "--output", str(tmp_path / "x.png")]
    assert main(args + ["--original-size", "512x512", "--aesthetic-score", "7"]) == 2
    assert "original_size, aesthetic_score: SDXL's size and aesthetic conditioning" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--crop-top-left", "8x8"])
    assert "expected X,Y pixels" in capsys.readouterr().err


def test_img2img(xl, xl_dir, init_image):
    ours = xl.img2img(init_image, PROMPT, negative_prompt=NEGATIVE, strength=0.6, steps=STEPS, seed=6)
    compare("sdxl img2img", ours,
            reference(xl_dir, "StableDiffusionXLImg2ImgPipeline", 6, image=init_image, strength=0.6))


def _a1111_conditioning(model_dir, chunks):
    """A1111's SDXL conditioning in torch: ``chunks`` is [[(text, weight), ...], ...] (BREAK between chunks).
    Each chunk is BOS + tokens + EOS + padding through both encoders; each encoder's penultimate hidden states
    are weighted and their mean restored on their own; pooled text_embeds of the first chunk."""
    pipe = diffusers_pipe(model_dir, "StableDiffusionXLPipeline")[0]
    encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    rows, pooled = [], None
    for chunk in chunks:
        parts = []
        for tokenizer, model in encoders:
            ids, weights = [tokenizer.bos_token_id], [1.0]
            for text, weight in chunk:
                tokens = tokenizer(text, add_special_tokens=False).input_ids
                ids, weights = ids + tokens, weights + [weight] * len(tokens)
            ids = ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (76 - len(ids))
            weights = torch.tensor(weights + [1.0] * (77 - len(weights)))
            with torch.no_grad():
                out = model(torch.tensor([ids]), output_hidden_states=True)
            z = out.hidden_states[-2][0]
            scaled = z * weights[:, None]
            parts.append(scaled * (z.mean() / scaled.mean()))
            if pooled is None and hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows)[None], pooled


def test_a1111_emphasis_and_break(xl, xl_dir):
    ours = xl.txt2img("a (red:1.3) fox BREAK in the [snow]", negative_prompt="(blurry:1.2) BREAK dark",
                      width=SIZE, height=SIZE, steps=STEPS, seed=7)
    embeds, pooled = _a1111_conditioning(xl_dir, [[("a", 1.0), ("red", 1.3), ("fox", 1.0)],
                                                  [("in the", 1.0), ("snow", 1 / 1.1)]])
    negative, negative_pooled = _a1111_conditioning(xl_dir, [[("blurry", 1.2)], [("dark", 1.0)]])
    compare("sdxl txt2img[emphasis, BREAK]", ours,
            reference(xl_dir, "StableDiffusionXLPipeline", 7, prompt=None, negative_prompt=None,
                      prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                      negative_pooled_prompt_embeds=negative_pooled, height=SIZE, width=SIZE))


def test_refiner_img2img(refiner, refiner_dir, refiner_export, init_image):
    """The refiner: text_encoder_2 only, aesthetic scores in place of the target size."""
    assert set(mf.read(refiner_export).components) == {"text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    ours = refiner.img2img(init_image, PROMPT, negative_prompt=NEGATIVE, strength=0.5, steps=STEPS, seed=9,
                           aesthetic_score=7.0, negative_aesthetic_score=2.0)
    compare("sdxl refiner img2img", ours,
            reference(refiner_dir, "StableDiffusionXLImg2ImgPipeline", 9, image=init_image, strength=0.5,
                      aesthetic_score=7.0, negative_aesthetic_score=2.0))


def test_openvino_gives_the_onnxruntime_image(xl, xl_export):
    pytest.importorskip("openvino")
    ov = sdrt.load(xl_export, runtime="openvino", progress=False)
    kwargs = dict(negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, seed=10)
    assert np.abs(pixels(ov.txt2img(PROMPT, **kwargs)) - pixels(xl.txt2img(PROMPT, **kwargs))).max() <= 1


def test_fp16_export_keeps_the_vae_fp32(tmp_path_factory, xl_dir, xl, tiny_taesd_dir):
    """SDXL's VAE overflows fp16 (force_upcast): an --fp16 export keeps both VAE graphs fp32 (the tiny
    autoencoder, TAESDXL, has no force_upcast: fp16)."""
    out = _export(tmp_path_factory, xl_dir, "sdxl_fp16", fp16=True, check_parity=False, tiny_vae=str(tiny_taesd_dir))
    precisions = {name: c.precision for name, c in mf.read(out).components.items()}
    assert precisions == {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16",
                          "vae_encoder": "fp32", "vae_decoder": "fp32",
                          "vae_encoder_tiny": "fp16", "vae_decoder_tiny": "fp16"}
    half = sdrt.load(out, runtime="onnxruntime", progress=False)
    kwargs = dict(negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, seed=11)
    assert np.abs(pixels(half.txt2img(PROMPT, **kwargs)) - pixels(xl.txt2img(PROMPT, **kwargs))).max() <= 2


@pytest.fixture(scope="module")
def mask_image():
    from PIL import Image
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[16:48, 8:40] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("strength", [0.7])
def test_inpaint_4_channel(xl, xl_dir, init_image, mask_image, strength):
    ours = xl.inpaint(init_image, mask_image, PROMPT, negative_prompt=NEGATIVE, strength=strength, steps=STEPS,
                      seed=12)
    compare(f"sdxl inpaint4[strength {strength}]", ours,
            reference(xl_dir, "StableDiffusionXLInpaintPipeline", 12, image=init_image, mask_image=mask_image,
                      strength=strength, height=SIZE, width=SIZE))


def test_inpaint_9_channel(tmp_path_factory, init_image, mask_image):
    from sdrt.exporters.random_model import build_random_model
    model_dir = build_random_model(tmp_path_factory.mktemp("sdxl_inpaint") / "model", "tiny-sdxl", inpaint=True,
                                   seed=6)
    pipe = sdrt.load(_export(tmp_path_factory, model_dir, "sdxl_inpaint_export", check_parity=False),
                     runtime="onnxruntime", progress=False)
    assert pipe.models.arch["unet_in_channels"] == 9
    ours = pipe.inpaint(init_image, mask_image, PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=13)
    compare("sdxl inpaint9", ours,
            reference(model_dir, "StableDiffusionXLInpaintPipeline", 13, image=init_image, mask_image=mask_image,
                      strength=1.0, height=SIZE, width=SIZE))


def test_lora_on_both_text_encoders_and_the_unet(xl_export, xl_dir, tmp_path):
    """A diffusers/PEFT SDXL LoRA (unet, text_encoder, text_encoder_2) gives diffusers' image with it."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_dir)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "linear_1"],
               "text_encoder": ["q_proj", "v_proj", "fc1"], "text_encoder_2": ["k_proj", "out_proj", "fc2"]}
    for component, modules in targets.items():
        getattr(pipe, component).add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=modules,
                                                        init_lora_weights="gaussian"), adapter_name="fox")
        for name, p in getattr(pipe, component).named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
    layers = {f"{c}_lora_layers": get_peft_model_state_dict(getattr(pipe, c), adapter_name="fox") for c in targets}
    metadata = {f"{c}_lora_adapter_metadata": getattr(pipe, c).peft_config["fox"].to_dict() for c in targets}
    pipe.save_lora_weights(tmp_path, **layers, **metadata)
    kwargs = dict(negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, sampler="Euler", seed=14)
    ours = sdrt.load(xl_export, runtime="onnxruntime", progress=False)
    plain = ours.txt2img(PROMPT, **kwargs)
    ours.set_loras([(tmp_path / "pytorch_lora_weights.safetensors", 1.0)])
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                   width=SIZE, generator=[torch.Generator("cpu").manual_seed(14)], output_type="np").images
    theirs = (out * 255).round().astype(np.int16)
    assert np.abs(pixels(plain) - theirs).max() > 10                  # the LoRA changes the image
    with_lora = ours.txt2img(PROMPT, **kwargs)
    compare("sdxl lora", with_lora, theirs)
    # the same LoRA in kohya's spelling (lora_te1_/lora_te2_/lora_unet_ + module path, explicit alpha)
    from safetensors.torch import save_file
    kohya = {}
    for c, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for key, value in layers[f"{c}_lora_layers"].items():
            module, part = key.rsplit(".lora_", 1)
            name = prefix + module.removeprefix("base_model.model.").replace(".", "_")
            kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value.contiguous()
            kohya[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    ours.set_loras([(tmp_path / "kohya.safetensors", 1.0)])
    assert np.abs(pixels(ours.txt2img(PROMPT, **kwargs)) - pixels(with_lora)).max() == 0


def test_textual_inversion_on_both_text_encoders(xl, xl_export, xl_dir, refiner, refiner_export, refiner_dir,
                                                 init_image, tmp_path):
    """A1111's SDXL embeddings (clip_l + clip_g, called by file name) extend each text encoder's table with its
    part: diffusers' image with load_textual_inversion of each part into its encoder (token= the name); the
    refiner (bigG only) takes clip_g. An SD 1.x embedding in the folder is skipped."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(1)
    parts = {"clip_l": torch.randn(2, 32, generator=g) * 0.4, "clip_g": torch.randn(2, 48, generator=g) * 0.4}
    save_file(parts, str(tmp_path / "fox-style.safetensors"))
    save_file({"emb_params": torch.ones(2, 32)}, str(tmp_path / "sd1-style.safetensors"))
    prompt, negative = "a fox-style painting of a fox in the snow", "blurry fox-style"
    kwargs = dict(negative_prompt=negative, steps=STEPS, sampler="Euler", seed=21)
    cases = ((xl, xl_export, xl_dir, "StableDiffusionXLPipeline", ("clip_l", "clip_g"), (prompt,),
              dict(width=SIZE, height=SIZE)),
             (refiner, refiner_export, refiner_dir, "StableDiffusionXLImg2ImgPipeline", ("clip_g",),
              (init_image, prompt), dict(strength=0.6)))
    for plain, export, folder, cls, used, args, task_args in cases:
        ours = sdrt.load(export, runtime="onnxruntime", progress=False, embeddings_dir=tmp_path)
        assert [e.name for e in ours.vocabulary.embeddings] == ["fox-style"]
        pipe = getattr(diffusers, cls).from_pretrained(folder)       # a fresh one: the embeddings change it
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        for part in used:
            encoder, tokenizer = ("text_encoder_2", "tokenizer_2") if part == "clip_g" else ("text_encoder", "tokenizer")
            pipe.load_textual_inversion(parts[part], token="fox-style", text_encoder=getattr(pipe, encoder),
                                        tokenizer=getattr(pipe, tokenizer))
        with torch.no_grad():
            out = pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5,
                       generator=[torch.Generator("cpu").manual_seed(21)], output_type="np", **task_args,
                       **({"image": init_image} if len(args) == 2 else {})).images
        theirs = (out * 255).round().astype(np.int16)
        task = "img2img" if len(args) == 2 else "txt2img"
        compare(f"sdxl textual inversion[{cls}]", getattr(ours, task)(*args, **task_args, **kwargs), theirs)
        assert np.abs(pixels(getattr(plain, task)(*args, **task_args, **kwargs)) - theirs).max() > 8   # it matters


SGM_MODULES = {   # diffusers path -> kohya's SGM spelling of the tiny SDXL (layers_per_block 2, attention in
    # down block 1 and up block 0): what sd-scripts writes for SDXL UNets
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k": "input_blocks_5_1_transformer_blocks_1_attn2_to_k",
    "down_blocks.1.attentions.0.proj_in": "input_blocks_4_1_proj_in",
    "down_blocks.0.resnets.1.conv1": "input_blocks_2_0_in_layers_2",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": "middle_block_1_transformer_blocks_0_ff_net_2",
    "mid_block.resnets.1.conv2": "middle_block_2_out_layers_3",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0":
        "output_blocks_2_1_transformer_blocks_0_attn1_to_out_0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
    "up_blocks.1.resnets.2.conv_shortcut": "output_blocks_5_0_skip_connection",
}


def test_kohya_sdxl_lora_with_sgm_names(xl_export, xl_dir, tmp_path):
    """kohya's SDXL UNet spelling (modules by their SGM names) gives the image diffusers gives with it."""
    pytest.importorskip("peft")
    from safetensors.torch import save_file
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_dir)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    targets = [("lora_unet_" + sgm, pipe.unet.get_submodule(path)) for path, sgm in SGM_MODULES.items()]
    # UNet only: diffusers 0.42 cannot read kohya's text-encoder keys under transformers 5 ("Could not
    # automatically infer state dict type"); lora_te1_/lora_te2_ are checked in the PEFT test above
    tensors = {}
    for key, m in targets:
        conv = isinstance(m, torch.nn.Conv2d)
        down = (4, m.in_channels, *m.kernel_size) if conv else (4, m.in_features)
        up = (m.out_channels, 4, 1, 1) if conv else (m.out_features, 4)
        tensors |= {f"{key}.lora_down.weight": torch.randn(down, generator=g) * 0.3,
                    f"{key}.lora_up.weight": torch.randn(up, generator=g) * 0.3, f"{key}.alpha": torch.tensor(2.0)}
    save_file(tensors, str(tmp_path / "sgm.safetensors"))
    pipe.load_lora_weights(str(tmp_path / "sgm.safetensors"))
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                   width=SIZE, generator=[torch.Generator("cpu").manual_seed(15)], output_type="np").images
    ours = sdrt.load(xl_export, runtime="onnxruntime", progress=False)
    kwargs = dict(negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, sampler="Euler", seed=15)
    theirs = (out * 255).round().astype(np.int16)
    assert np.abs(pixels(ours.txt2img(PROMPT, **kwargs)) - theirs).max() > 10     # the LoRA changes the image
    ours.set_loras([(tmp_path / "sgm.safetensors", 1.0)])
    compare("sdxl kohya lora (SGM names)", ours.txt2img(PROMPT, **kwargs), theirs)


@pytest.fixture(scope="module")
def xl_file_export(tmp_path_factory, xl_dir, tiny_taesd_dir):
    """The tiny SDXL as an A1111-style SGM single file, exported offline (the configs sdrt writes) with a tiny
    autoencoder (TAESDXL's structure: TAESD's, other weights)."""
    from sdrt.exporters import families

    from ..exporters.ldm import to_single_file
    checkpoint = to_single_file(xl_dir, tmp_path_factory.mktemp("sdxl_single_file") / "sd_xl.safetensors")
    assert families.from_checkpoint(*families.read_checkpoint(checkpoint)).family == "sdxl"
    return _export(tmp_path_factory, checkpoint, "sdxl_single_file_export", check_parity=False,
                   tiny_vae=str(tiny_taesd_dir))


def test_single_file_checkpoint(xl_file_export, xl, init_image):
    """The single file's export gives the images of the diffusers folder it was made from."""
    facts = mf.read(xl_file_export).architecture
    assert facts.pop("tiny_vae_scaling_factor") == 1.0 and facts == xl.models.arch
    ours = sdrt.load(xl_file_export, runtime="onnxruntime", progress=False)
    kwargs = dict(negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, seed=16)
    for task, args in (("txt2img", (PROMPT,)), ("img2img", (init_image, PROMPT))):
        image, theirs = getattr(ours, task)(*args, **kwargs), getattr(xl, task)(*args, **kwargs)
        assert np.abs(pixels(image) - pixels(theirs)).max() == 0, task


def test_tiny_vae(xl_file_export, xl_dir, tiny_taesd_dir, init_image):
    """vae="tiny" decodes (and encodes) with the tiny autoencoder at its own scaling (1.0, not SDXL's 0.13025),
    as diffusers' SDXL pipelines with ``vae=AutoencoderTiny``."""
    ours = sdrt.load(xl_file_export, runtime="onnxruntime", progress=False)
    base, config = diffusers_pipe(xl_dir, "StableDiffusionXLPipeline")
    components = {**base.components, "vae": diffusers.AutoencoderTiny.from_pretrained(tiny_taesd_dir),
                  "scheduler": diffusers.EulerDiscreteScheduler.from_config(config)}
    kwargs = dict(negative_prompt=NEGATIVE, steps=STEPS, sampler="Euler", vae="tiny")
    for cls, seed, args, extra in (("StableDiffusionXLPipeline", 19, (PROMPT,), dict(height=SIZE, width=SIZE)),
                                   ("StableDiffusionXLImg2ImgPipeline", 20, (init_image, PROMPT),
                                    dict(image=init_image, strength=0.6))):
        pipe = getattr(diffusers, cls)(**components)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np",
                       generator=[torch.Generator("cpu").manual_seed(seed)], **extra).images
        task = "txt2img" if len(args) == 1 else "img2img"
        image = getattr(ours, task)(*args, seed=seed, **({"strength": 0.6} if task == "img2img" else
                                                          dict(width=SIZE, height=SIZE)), **kwargs)
        compare(f"sdxl {task}[tiny vae]", image, (out * 255).round().astype(np.int16))
        assert "VAE Decoder: TAESD" in image.infotexts[0]


def test_without_a_tiny_vae_sdxl_names_taesdxl(xl):
    from sdrt.errors import InvalidRequest
    with pytest.raises(InvalidRequest, match="--tiny-vae madebyollin/taesdxl"):
        xl.txt2img(PROMPT, width=SIZE, height=SIZE, steps=1, vae="tiny")
def test_single_file_refiner_loads_the_folders_model(refiner_dir, tmp_path):
    """The refiner's single file (bigG alone, at conditioner.embedders.0) gives the folder's weights, flags and
    architecture facts (its export is the folder's code path from there)."""
    from sdrt.exporters import architecture_facts
    from sdrt.exporters.sources import load_source

    from ..exporters.ldm import to_single_file
    loaded = load_source(str(to_single_file(refiner_dir, tmp_path / "refiner.safetensors")), progress=False)
    folder = load_source(str(refiner_dir), progress=False)
    assert loaded.text_encoder is None and loaded.tokenizer is None and loaded.detected.family == "sdxl-refiner"
    for part in ("text_encoder_2", "unet", "vae"):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(folder, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert loaded.pipeline_config == {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
    assert architecture_facts(loaded) == architecture_facts(folder)
    assert loaded.scheduler_config == folder.scheduler_config
