"""Two-pass and canvas tasks built from the parity-tested ones: hires fix, outpainting, tiled VAE.

diffusers has no hires fix or outpainting, so these check the composition: hires with an image upscaler is
exactly img2img of the upscaled first pass; outpainting is exactly inpainting of the extended canvas; latent
resizing matches torch's ``interpolate``; tiled VAE blending is exact on a tile-independent model and close
to a whole-image decode on the real (random-weight) VAE.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.errors import InvalidRequest
from sdrt.pipelines import images, resize
from sdrt.pipelines.pipeline import Hires
from sdrt.pipelines.tiling import tiled

SIZE, STEPS = 64, 4


@pytest.fixture(scope="module")
def pipe(tiny_export):
    return sdrt.load(tiny_export, runtime="onnxruntime", progress=False)


def arrays(result):
    return np.stack([np.asarray(im, np.int16) for im in result.images])


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "nearest-exact"])
@pytest.mark.parametrize("size, out", [((8, 8), (16, 16)), ((8, 12), (13, 30)), ((9, 7), (20, 11)),
                                       ((16, 16), (8, 8))])
def test_latent_resize_matches_torch(mode, size, out):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 4, *size)).astype(np.float32)
    extra = {"align_corners": False} if mode == "bilinear" else {}
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=out, mode=mode, **extra).numpy()
    np.testing.assert_allclose(resize.latents(x, *out, mode), expected, atol=1e-5)


def test_hires_with_an_image_upscaler_is_img2img_of_the_upscaled_first_pass(pipe):
    kw = dict(negative_prompt="blurry", steps=STEPS, sampler="Euler a", seed=31)
    hires = Hires(scale=1.5, upscaler="Lanczos", steps=3, strength=0.6)
    ours = pipe.txt2img("a red fox", width=SIZE, height=SIZE, hires=hires, **kw)
    first = pipe.txt2img("a red fox", width=SIZE, height=SIZE, **kw)
    upscaled = first.images[0].resize((96, 96), Image.Resampling.LANCZOS)
    expected = pipe.img2img(upscaled, "a red fox", strength=0.6, **{**kw, "steps": 3})
    assert ours.images[0].size == (96, 96)
    assert (arrays(ours) == arrays(expected)).all()
    assert "Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Lanczos" in ours.infotexts[0]
    assert "Size: 64x64" in ours.infotexts[0] and "Denoising strength: 0.6" in ours.infotexts[0]


def test_hires_in_latent_space(pipe):
    result = pipe.txt2img("a red fox", width=SIZE, height=48, steps=STEPS, seed=3, batch_size=2,
                          hires=Hires(width=96, upscaler="Latent (nearest)", strength=0.5))
    assert [im.size for im in result.images] == [(96, 72), (96, 72)]
    assert "Hires resize: 96x72" in result.infotexts[0]
    again = pipe.txt2img("a red fox", width=SIZE, height=48, steps=STEPS, seed=3, batch_size=2,
                         hires=Hires(width=96, upscaler="Latent (nearest)", strength=0.5))
    assert (arrays(result) == arrays(again)).all()


def test_outpaint_is_inpaint_of_the_extended_canvas(pipe):
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    canvas, mask = images.extend(image, 16, 8, 0, 8, overlap=4)
    c, m = np.asarray(canvas), np.asarray(mask)
    assert canvas.size == (64, 56) and mask.size == (64, 56)
    assert (c[:48, 16:56] == np.asarray(image)).all()
    assert (c[:48, :16] == np.asarray(image)[:, :1]).all()            # the left edge repeated outwards
    assert (m[:44, 20:52] == 0).all() and m[:, :20].all() and m[:, 52:].all() and m[44:].all()
    kw = dict(negative_prompt="", steps=STEPS, sampler="Euler", seed=8)
    ours = pipe.outpaint(image, "a red fox", left=16, right=8, bottom=8, overlap=4, **kw)
    assert (arrays(ours) == arrays(pipe.inpaint(canvas, mask, "a red fox", **kw))).all()


def test_tiled_blending_is_exact_when_tiles_do_not_interact():
    x = np.random.default_rng(1).standard_normal((1, 4, 40, 72)).astype(np.float32)

    def upsample(t):                       # a per-cell "decoder": tiling cannot change its output
        return np.repeat(np.repeat(t[:, :3] * 2.0, 8, axis=2), 8, axis=3)
    np.testing.assert_allclose(tiled(upsample, x, 8, tile=16, overlap=4), upsample(x), atol=1e-5)
    down = tiled(lambda t: t[:, :, ::8, ::8], np.repeat(np.repeat(x, 8, 2), 8, 3), 1 / 8, tile=128, overlap=32)
    np.testing.assert_allclose(down, x, atol=1e-5)


def test_tiled_vae_is_close_to_a_whole_decode(pipe):
    z = np.random.default_rng(2).standard_normal((1, 4, 48, 80)).astype(np.float32)

    def run(t):
        return pipe.models.vae_decoder.run({"latent_sample": t})["sample"]
    whole, parts = run(z), tiled(run, z, 8, tile=32, overlap=16)
    # GroupNorm sees each tile's own statistics: on random weights and random latents the mean error is
    # ~0.035 on outputs of mean magnitude ~0.26 (a real VAE on real latents differs far less)
    assert parts.shape == whole.shape and np.isfinite(parts).all()
    assert np.abs(parts - whole).mean() < 0.05


def test_tiled_vae_option_runs_every_task(pipe):
    result = pipe.txt2img("a red fox", width=SIZE, height=SIZE, steps=2, seed=1, tiled_vae=True)
    assert "Tiled VAE: True" in result.infotexts[0]
    plain = pipe.txt2img("a red fox", width=SIZE, height=SIZE, steps=2, seed=1)
    assert (arrays(result) == arrays(plain)).all()            # one tile: the same as a whole decode


@pytest.mark.parametrize("call, message", [
    (lambda p, im: p.outpaint(im, "x", left=12), "non-negative multiples of 8"),
    (lambda p, im: p.outpaint(im, "x"), "at least one positive"),
    (lambda p, im: p.txt2img("x", width=SIZE, height=SIZE, hires=Hires(upscaler="ESRGAN_4x")),
     "unknown hires upscaler 'ESRGAN_4x'"),
])
def test_bad_task_input(pipe, call, message):
    with pytest.raises(InvalidRequest, match=message):
        call(pipe, Image.new("RGB", (SIZE, SIZE)))


# -- seamless tiling: circular padding, as A1111's "Tiling" ---------------------------------------------

@pytest.fixture(scope="module")
def tiling_export(tmp_path_factory, tiny_model_dir):
    from sdrt.exporters import ExportOptions, export
    out = tmp_path_factory.mktemp("tiling") / "out"
    export(str(tiny_model_dir), out, ExportOptions(tiling=True), progress=False)
    return out


def test_seamless_tiling_matches_diffusers_with_circular_convs(tiling_export, tiny_model_dir):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    for module in (ref.unet, ref.vae):                   # what A1111 does for Tiling
        for conv in module.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.padding_mode = "circular"
    out = ref("a red fox", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
              width=80, generator=torch.Generator("cpu").manual_seed(6), output_type="np").images
    theirs = (out * 255).round().astype(np.int16)
    pipe = sdrt.load(tiling_export, runtime="onnxruntime", progress=False)
    kw = dict(negative_prompt="blurry", width=80, height=SIZE, steps=STEPS, sampler="Euler", seed=6)
    ours = pipe.txt2img("a red fox", tiling=True, **kw)
    assert int(np.abs(arrays(ours) - theirs).max()) <= 2
    assert "Tiling: True" in ours.infotexts[0]
    plain = pipe.txt2img("a red fox", **kw)
    assert np.abs(arrays(plain) - theirs).max() > 8                  # circular padding changes the image
    a = arrays(ours)[0].astype(np.float32)
    wrap = np.abs(a[:, -1] - a[:, 0]).mean()                          # the seam when tiled side by side
    inside = np.abs(np.diff(a, axis=1)).mean()
    assert wrap < 2 * inside


def test_tiling_needs_the_tiling_graphs(pipe):
    with pytest.raises(InvalidRequest, match="--tiling"):
        pipe.txt2img("a red fox", width=SIZE, height=SIZE, steps=2, tiling=True)


def test_txt2img_and_img2img_on_an_inpainting_model(tiny_inpaint_export):
    """A 9-channel UNet sees everything masked (A1111): txt2img is inpainting a blank image under a white
    mask, img2img is inpainting the image under a white mask, both parity-tested against diffusers."""
    p = sdrt.load(tiny_inpaint_export, runtime="onnxruntime", progress=False)
    white, kw = Image.new("L", (SIZE, SIZE), 255), dict(negative_prompt="", steps=STEPS, sampler="Euler", seed=9)
    ours = p.txt2img("a red fox", width=SIZE, height=SIZE, **kw)
    assert (arrays(ours) == arrays(p.inpaint(Image.new("RGB", (SIZE, SIZE)), white, "a red fox", **kw))).all()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    ours = p.img2img(image, "a red fox", strength=0.6, **kw)
    assert (arrays(ours) == arrays(p.inpaint(image, white, "a red fox", strength=0.6, **kw))).all()
    assert p.txt2img("a red fox", width=SIZE, height=SIZE, hires=Hires(scale=1.5), **kw).images[0].size == (96, 96)
