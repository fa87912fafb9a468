"""Few-step generation and the tiny autoencoder against diffusers on the same tiny models and seeds.

References: StableDiffusion(Img2Img)Pipeline with ``vae=AutoencoderTiny`` (TAESD), LatentConsistencyModelPipeline
(an LCM-distilled UNet: guidance through ``timestep_cond``, no CFG), ``load_lora_weights`` + LCMScheduler
(LCM-LoRA on a base model) and EulerAncestralDiscreteScheduler(timestep_spacing="trailing") at guidance 0
(SD-Turbo). Images must agree within ``TOLERANCE`` per pixel, as in test_parity.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt import manifest as mf
from sdrt.cli import main
from sdrt.errors import InvalidRequest
from sdrt.pipelines import samplers
from sdrt.pipelines.denoisers import guidance_embedding

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

from .conftest import WORST      # noqa: E402

SIZE, TOLERANCE = 64, 2
PROMPT, NEGATIVE = "a red fox in the snow, photograph", "blurry"
# the modules LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) trains: attention, feed-forward, resnet convs and
# their time projections, and the down/upsampling convs
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")


@pytest.fixture(scope="module")
def taesd_export(tmp_path_factory, tiny_model_dir, tiny_taesd_dir):
    """The tiny model exported with the tiny autoencoder, through the CLI flag."""
    out = tmp_path_factory.mktemp("taesd_export") / "sdrt"
    assert main(["export", str(tiny_model_dir), str(out), "--tiny-vae", str(tiny_taesd_dir)]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(taesd_export):
    return sdrt.load(taesd_export, runtime="onnxruntime", progress=False)


@pytest.fixture(scope="module")
def lcm_pipe(tmp_path_factory, tiny_lcm_model_dir):
    from sdrt.exporters import export
    out = tmp_path_factory.mktemp("lcm_export") / "sdrt"
    export(str(tiny_lcm_model_dir), out, progress=False)
    return sdrt.load(out, runtime="onnxruntime", progress=False)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def compare(name: str, ours, theirs: np.ndarray) -> None:
    theirs = (theirs * 255).round().astype(np.int16)
    diff = int(np.abs(pixels(ours) - theirs).max())
    WORST[name] = diff
    assert diff <= TOLERANCE, f"{name}: max pixel difference {diff}/255 > {TOLERANCE}"
    assert theirs.std() > 5, f"{name}: the reference image is flat, the comparison proves nothing"


def diffusers_pipe(pipeline_cls, folder, sampler, scheduler_kwargs=None, **components):
    """diffusers' pipeline ``pipeline_cls`` on ``folder`` with the scheduler of sdrt's ``sampler``."""
    cls, extra = samplers.DIFFUSERS_EQUIVALENT[sampler]
    p = getattr(diffusers, pipeline_cls).from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                         **components)
    p.scheduler = getattr(diffusers, cls).from_config(p.scheduler.config, **extra, **(scheduler_kwargs or {}))
    p.set_progress_bar_config(disable=True)
    return p


def run(p, seed, batch_size=1, **kwargs) -> np.ndarray:
    """Images in [0, 1] from CPU generators seeded seed + i, as sdrt seeds a batch."""
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch_size)]
    return p(generator=gens, num_images_per_prompt=batch_size, output_type="np", **kwargs).images


class UnetCalls:
    """Records the batch size of every UNet call of a loaded pipeline."""

    def __init__(self, pipe):
        self.pipe, self.inner, self.batches = pipe, pipe.models.unet, []

    def __enter__(self):
        inner, batches = self.inner, self.batches

        class Recording:
            spec = inner.spec

            def run(self, feeds):
                batches.append((len(feeds["sample"]), sorted(feeds)))
                return inner.run(feeds)
        self.pipe.models.unet = Recording()
        return self.batches

    def __exit__(self, *exc):
        self.pipe.models.unet = self.inner


# -- the tiny autoencoder (TAESD) ---------------------------------------------------------------------------

def tiny_vae(tiny_taesd_dir):
    return diffusers.AutoencoderTiny.from_pretrained(tiny_taesd_dir)


def test_tiny_vae_export(taesd_export):
    manifest = mf.read(taesd_export)
    assert {n: c.spec for n, c in manifest.components.items() if "tiny" in n} == {
        "vae_encoder_tiny": "vae_encoder_tiny", "vae_decoder_tiny": "vae_decoder_tiny"}
    assert {"vae_encoder_tiny.onnx", "vae_decoder_tiny.onnx"} <= set(manifest.files)
    assert manifest.architecture["tiny_vae_scaling_factor"] == 1.0
    assert manifest.architecture["vae_scaling_factor"] == 0.18215


@pytest.mark.parametrize("batch_size", [1, 2])
def test_tiny_vae_txt2img_matches_diffusers(pipe, tiny_model_dir, tiny_taesd_dir, batch_size):
    ours = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=6, sampler="Euler a",
                        seed=3, batch_size=batch_size, vae="tiny")
    ref = diffusers_pipe("StableDiffusionPipeline", tiny_model_dir, "Euler a", vae=tiny_vae(tiny_taesd_dir))
    theirs = run(ref, 3, batch_size, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, height=SIZE,
                 width=SIZE)
    compare(f"taesd txt2img[batch {batch_size}]", ours, theirs)
    assert "VAE Decoder: TAESD" in ours.infotexts[0]
    full = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=6, sampler="Euler a",
                        seed=3, batch_size=batch_size)
    assert np.abs(pixels(full) - pixels(ours)).max() > 8 * TOLERANCE      # the other decoder really ran


def test_tiny_vae_img2img_draws_no_noise_to_encode(pipe, tiny_model_dir, tiny_taesd_dir):
    """TAESD's latents are deterministic: the noise stream must stay aligned with diffusers' (batch of 2)."""
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    ours = pipe.img2img(image, PROMPT, negative_prompt=NEGATIVE, strength=0.6, steps=8, sampler="Euler a", seed=5,
                        batch_size=2, vae="tiny")
    ref = diffusers_pipe("StableDiffusionImg2ImgPipeline", tiny_model_dir, "Euler a", vae=tiny_vae(tiny_taesd_dir))
    theirs = run(ref, 5, 2, prompt=PROMPT, negative_prompt=NEGATIVE, image=image, strength=0.6,
                 num_inference_steps=8)
    compare("taesd img2img", ours, theirs)
    assert "VAE Encoder: TAESD" in ours.infotexts[0]


def test_preview_decodes_latents_with_the_tiny_decoder(pipe, tiny_taesd_dir):
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 12)).astype(np.float32)
    previews = pipe.preview(latents)
    assert [im.size for im in previews] == [(96, 64)] * 2
    with torch.no_grad():
        image = tiny_vae(tiny_taesd_dir).decode(torch.from_numpy(latents)).sample
    compare("taesd preview", previews, (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def test_server_taesd_live_preview(pipe, tiny_export):
    """/progress's "TAESD" preview is the tiny decoder's image; an export without one falls back to Approx cheap."""
    from sdrt.server import preview
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    shown = preview.RENDERERS["TAESD"](pipe, latents)
    assert [np.asarray(im).tolist() for im in shown] == [np.asarray(im).tolist() for im in pipe.preview(latents)]
    plain = sdrt.load(tiny_export, runtime="onnxruntime", progress=False)
    assert [im.size for im in preview.RENDERERS["TAESD"](plain, latents)] == [(8, 8)]      # latent-sized


def test_without_a_tiny_vae_the_error_says_how_to_export_one(tiny_export):
    plain = sdrt.load(tiny_export, runtime="onnxruntime", progress=False)
    assert not plain.has_tiny_vae
    with pytest.raises(InvalidRequest, match="--tiny-vae"):
        plain.txt2img(PROMPT, width=SIZE, height=SIZE, steps=1, vae="tiny")
    with pytest.raises(InvalidRequest, match="--tiny-vae"):
        plain.preview(np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(InvalidRequest, match="vae must be one of"):
        plain.txt2img(PROMPT, width=SIZE, height=SIZE, steps=1, vae="taesd")


def test_cli_generate_vae_tiny(taesd_export, tmp_path):
    out = tmp_path / "fox.png"
    assert main(["generate", str(taesd_export), "--prompt", PROMPT, "--width", "64", "--height", "64",
                 "--steps", "2", "--seed", "1", "--vae", "tiny", "--output", str(out)]) == 0
    assert "VAE Decoder: TAESD" in Image.open(out).info["parameters"]


# -- LCM: a distilled UNet with the guidance embedding, and LCM-LoRA on a base model -------------------------

def test_guidance_embedding_matches_diffusers():
    p = diffusers.LatentConsistencyModelPipeline.__new__(diffusers.LatentConsistencyModelPipeline)
    for w, dim in ((7.5, 256), (0.0, 32), (1.25, 33)):
        theirs = p.get_guidance_scale_embedding(torch.tensor([w, w]), embedding_dim=dim).numpy()
        # sin/cos of 1000 w * freq (up to ~10^4 rad) in float32: an ulp of freq moves them by ~1e-3
        np.testing.assert_allclose(guidance_embedding(w, dim, 2), theirs, atol=2e-3, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_lcm_unet_matches_latent_consistency_pipeline(lcm_pipe, tiny_lcm_model_dir, batch_size):
    with UnetCalls(lcm_pipe) as calls:
        ours = lcm_pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=4,
                                guidance_scale=8.5, sampler="LCM", seed=7, batch_size=batch_size)
    # guidance goes through timestep_cond: one UNet call per step at the batch size, no negative prompt
    assert calls == [(batch_size, ["encoder_hidden_states", "sample", "timestep", "timestep_cond"])] * 4
    ref = diffusers_pipe("LatentConsistencyModelPipeline", tiny_lcm_model_dir, "LCM")
    theirs = run(ref, 7, batch_size, prompt=PROMPT, num_inference_steps=4, guidance_scale=8.5, height=SIZE,
                 width=SIZE)
    compare(f"lcm unet[batch {batch_size}]", ours, theirs)
    other = lcm_pipe.txt2img(PROMPT, width=SIZE, height=SIZE, steps=4, guidance_scale=2.0, sampler="LCM", seed=7)
    assert np.abs(pixels(other)[0] - pixels(ours)[0]).max() > 8 * TOLERANCE     # the embedding matters


def lcm_lora(path, unet, seed, peft=False):
    """A random LCM-LoRA-shaped file over every module LCM-LoRA trains: kohya (alpha 8, rank 4) or PEFT."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(LCM_LORA_TARGETS):
            continue
        conv = isinstance(m, torch.nn.Conv2d)
        down = (4, m.in_channels, *m.kernel_size) if conv else (4, m.in_features)
        up = (m.out_channels, 4, 1, 1) if conv else (m.out_features, 4)
        down, up = torch.randn(down, generator=g) * 0.2, torch.randn(up, generator=g) * 0.2
        if peft:
            tensors |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
        else:
            key = "lora_unet_" + name.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down.half(), f"{key}.lora_up.weight": up.half(),
                        f"{key}.alpha": torch.tensor(8.0).half()}
    from safetensors.torch import save_file
    save_file(tensors, str(path))
    return path, len(tensors) // (2 if peft else 3)


@pytest.mark.parametrize("peft", [False, True], ids=["kohya", "peft"])
def test_lcm_lora_on_the_base_model(pipe, tiny_model_dir, tmp_path, peft):
    pytest.importorskip("peft")
    base = diffusers.UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    path, modules = lcm_lora(tmp_path / "lcm-lora.safetensors", base, seed=11, peft=peft)
    assert modules > 60
    pipe.set_loras([(str(path), 1.0)])
    try:
        ours = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=4, guidance_scale=1.5,
                            sampler="LCM", seed=9)
    finally:
        pipe.set_loras([])
    ref = diffusers_pipe("StableDiffusionPipeline", tiny_model_dir, "LCM")
    ref.load_lora_weights(str(path))
    theirs = run(ref, 9, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=1.5,
                 height=SIZE, width=SIZE)
    compare(f"lcm-lora[{'peft' if peft else 'kohya'}]", ours, theirs)
    plain = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=4, guidance_scale=1.5,
                         sampler="LCM", seed=9)
    assert np.abs(pixels(plain) - pixels(ours)).max() > 8 * TOLERANCE        # the LoRA was merged


# -- SD-Turbo style: 1-4 steps, guidance 0, trailing timesteps ---------------------------------------------

@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_matches_diffusers_trailing_euler_a_without_guidance(pipe, tiny_model_dir, steps):
    with UnetCalls(pipe) as calls:
        ours = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=steps,
                            guidance_scale=0.0, sampler="Euler a", scheduler="sgm_uniform", seed=13)
    assert [batch for batch, _ in calls] == [1] * steps          # no unconditional pass at guidance <= 1
    ref = diffusers_pipe("StableDiffusionPipeline", tiny_model_dir, "Euler a", {"timestep_spacing": "trailing"})
    theirs = run(ref, 13, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=0.0,
                 height=SIZE, width=SIZE)
    compare(f"turbo[{steps} steps]", ours, theirs)
    assert "Schedule type: SGM Uniform" in ours.infotexts[0]


def test_sgm_uniform_refuses_samplers_without_trailing_spacing(pipe):
    for sampler, scheduler in (("DPM++ SDE", "sgm_uniform"), ("Euler Karras", "SGM Uniform")):
        with pytest.raises(InvalidRequest, match="SGM Uniform"):
            pipe.txt2img(PROMPT, width=SIZE, height=SIZE, steps=2, sampler=sampler, scheduler=scheduler)


# -- the A1111 API: "VAE type for decode" = TAESD, schedule type SGM Uniform ------------------------------

def test_server_taesd_and_sgm_uniform_equal_the_python_api(pipe, taesd_export):
    webuiapi = pytest.importorskip("webuiapi")
    pytest.importorskip("uvicorn")
    from sdrt.server import ServerOptions, create_app

    from ..server.test_server import running
    options = ServerOptions(folders=(taesd_export,), runtime="onnxruntime")
    with running(create_app(options, lambda folder: sdrt.load(folder, runtime="onnxruntime", progress=False))) as port:
        api = webuiapi.WebUIApi(port=port)
        r = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=21, width=SIZE, height=SIZE, steps=2,
                        cfg_scale=0.0, sampler_name="Euler a", scheduler="SGM Uniform",
                        override_settings={"sd_vae_decode_method": "TAESD"})
        with pytest.raises(RuntimeError, match="SGM Uniform"):
            api.txt2img(prompt=PROMPT, width=SIZE, height=SIZE, steps=2, sampler_name="DPM++ SDE",
                        scheduler="SGM Uniform")
    ref = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, seed=21, width=SIZE, height=SIZE, steps=2,
                       guidance_scale=0.0, sampler="Euler a", scheduler="sgm_uniform", vae="tiny")
    assert np.array_equal(pixels([im.convert("RGB") for im in r.images]), pixels(ref.images))
    assert r.info["infotexts"] == ref.infotexts
    assert "VAE Decoder: TAESD" in ref.infotexts[0] and "Schedule type: SGM Uniform" in ref.infotexts[0]
