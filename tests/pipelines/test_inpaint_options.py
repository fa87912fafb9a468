"""A1111's img2img/inpainting options: "Only masked", inpainting_fill, mask blur, resize_mode.

References: diffusers' ``padding_mask_crop`` (A1111's crop/paste, same tiny model and seed), diffusers'
``VaeImageProcessor`` resize modes and crop region (ported from A1111), ``cv2.GaussianBlur`` (what A1111
blurs masks with), torch's CPU generator for "latent noise", and for "latent upscale" diffusers' img2img fed
the torch-encoded, torch-interpolated latents.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.errors import InvalidRequest
from sdrt.pipelines import images, masking
from sdrt.pipelines.pipeline import Request
from sdrt.pipelines.rng import make_generator

from .test_parity import NEGATIVE, PROMPT, RUNTIME, STEPS, compare, init_image, mask_image, pixels  # noqa: F401

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SIZE = 64


@pytest.fixture(scope="module")
def pipe(tiny_export):
    return sdrt.load(tiny_export, runtime=RUNTIME, progress=False)


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_inpaint_export):
    return sdrt.load(tiny_inpaint_export, runtime=RUNTIME, progress=False)


@pytest.fixture(scope="module")
def big_image():
    """96x80: larger than the 64x64 the model runs at, so "Only masked" crops and scales."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:80, 0:96]
    rgb = np.stack([x * 2.6, y * 3.1, rng.uniform(0, 255, x.shape)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def small_mask():
    m = np.zeros((80, 96), np.uint8)
    m[30:50, 52:70] = 255
    return Image.fromarray(m)


def random_masks(n):
    rng = np.random.default_rng(0)
    for _ in range(n):
        h, w = rng.integers(20, 90, 2)
        m = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0:rng.integers(y0 + 1, h + 1), x0:rng.integers(x0 + 1, w + 1)] = 255
        yield Image.fromarray(m), int(rng.integers(0, 40)), *(int(v) * 8 for v in rng.integers(4, 17, 2))


def test_crop_region_is_a1111s():
    # the docstring example of A1111's expand_crop_region: a 128x32 mask region processed at 512x512 -> 128x128
    assert masking.expand_crop_region((0, 0, 128, 32), 512, 512, 512, 512) == (0, 0, 128, 128)
    assert masking.expand_crop_region((200, 100, 328, 132), 512, 512, 512, 512) == (200, 52, 328, 180)
    assert masking.expand_crop_region((0, 480, 40, 512), 512, 512, 512, 512) == (0, 472, 40, 512)
    assert masking.crop_region(Image.new("L", (32, 32))) is None        # empty: A1111 falls back to img2img
    # diffusers' get_crop_region is A1111's get_crop_region + expand_crop_region (loop version)
    for mask, pad, w, h in random_masks(60):
        box = masking.crop_region(mask, pad)
        ours = masking.expand_crop_region(box, w, h, mask.width, mask.height)
        assert ours == diffusers.image_processor.VaeImageProcessor.get_crop_region(mask, w, h, pad)


def test_expand_crop_region_shifts_back_inside():
    # a region at the bottom edge grown to a square is shifted up, then clamped (A1111's order of fixes)
    assert masking.expand_crop_region((10, 90, 50, 100), 64, 64, 100, 100) == (10, 60, 50, 100)
    assert masking.expand_crop_region((0, 0, 10, 100), 64, 64, 50, 100) == (0, 0, 50, 100)


def test_mask_blur_is_cv2s():
    cv2 = pytest.importorskip("cv2")
    mask, *_ = next(random_masks(1))
    a = np.asarray(mask)
    for sigma in (1, 4, 11):
        k = 2 * int(2.5 * sigma + 0.5) + 1
        x = masking.gaussian_blur(a, sigma, axis=1)
        assert np.abs(x.astype(int) - cv2.GaussianBlur(a, (k, 1), sigma)).max() <= 1
        y = masking.gaussian_blur(a, sigma, axis=0)
        assert np.abs(y.astype(int) - cv2.GaussianBlur(a, (1, k), sigma)).max() <= 1
    both = np.asarray(masking.prepare(mask, (3, 5)))
    ref = cv2.GaussianBlur(cv2.GaussianBlur(a, (2 * int(8) + 1, 1), 3), (1, 2 * int(13) + 1), 5)
    assert np.abs(both.astype(int) - ref).max() <= 2
    assert np.array_equal(np.asarray(masking.prepare(mask, invert=True)), 255 - a)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (80, 40)])
def test_resize_modes_are_a1111s(big_image, size):
    processor = diffusers.image_processor.VaeImageProcessor(resample="lanczos")
    for mode, theirs in ((0, "default"), (1, "crop"), (2, "fill")):
        ours = images.resize_image(big_image, mode, *size)
        assert ours.size == size
        expected = processor.resize(big_image, height=size[1], width=size[0], resize_mode=theirs)
        assert np.array_equal(np.asarray(ours), np.asarray(expected)), (mode, size)


@pytest.mark.parametrize("which", ["4", "9"])
def test_only_masked_matches_diffusers_padding_mask_crop(pipe, inpaint_pipe, tiny_model_dir,
                                                         tiny_inpaint_model_dir, big_image, small_mask, which):
    p, folder = (pipe, tiny_model_dir) if which == "4" else (inpaint_pipe, tiny_inpaint_model_dir)
    ours = p.inpaint(big_image, small_mask, PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="Euler a",
                     seed=5, width=SIZE, height=SIZE, strength=0.8, only_masked=True, padding=6)
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt=PROMPT, negative_prompt=NEGATIVE, image=big_image, mask_image=small_mask, width=SIZE,
              height=SIZE, strength=0.8, padding_mask_crop=6, num_inference_steps=STEPS, guidance_scale=7.5,
              generator=[torch.Generator("cpu").manual_seed(5)], output_type="pil").images
    theirs = np.stack([np.asarray(im, np.int16) for im in out])
    assert ours.images[0].size == big_image.size
    compare(f"only_masked{which}", ours, theirs)
    outside = np.asarray(small_mask) == 0
    assert np.array_equal(pixels(ours)[0][outside], np.asarray(big_image, np.int16)[outside])
    assert "Inpaint area: Only masked" in ours.infotexts[0] and "Masked area padding: 6" in ours.infotexts[0]


def test_only_masked_pastes_through_the_blurred_mask(pipe, big_image, small_mask):
    kw = dict(steps=2, seed=3, width=SIZE, height=SIZE, strength=0.7)
    ours = pipe.inpaint(big_image, small_mask, PROMPT, only_masked=True, padding=0, mask_blur=4, **kw)
    blurred = masking.prepare(small_mask, 4)
    box = masking.expand_crop_region(masking.crop_region(blurred, 0), SIZE, SIZE, 96, 80)
    crop = pipe.inpaint(images.resize_image(big_image.crop(box), 2, SIZE, SIZE),
                        images.resize_image(blurred.crop(box), 2, SIZE, SIZE), PROMPT, **kw)
    assert np.array_equal(np.asarray(ours[0]), np.asarray(masking.paste(crop[0], big_image, blurred, box)))
    assert "Mask blur: 4" in ours.infotexts[0]
    # an empty mask is img2img of the whole picture (A1111)
    empty = pipe.inpaint(big_image, Image.new("L", big_image.size), PROMPT, only_masked=True, **kw)
    assert np.array_equal(pixels(empty), pixels(pipe.img2img(big_image, PROMPT, **kw)))


def start_latents(p, fill, mask, strength=0.6, seed=4):
    """The start latents and sigma of an inpaint with this fill, seen through the sampler's first call."""
    req = Request(PROMPT, width=SIZE, height=SIZE, steps=4, seed=seed, strength=strength)
    plan = sdrt.pipelines.samplers.plan("Euler", 4, p.models.scheduler_config, strength=strength)
    pixels_ = images.to_array(Image.new("RGB", (SIZE, SIZE), (200, 40, 90)), SIZE, SIZE)
    gens = [make_generator("cpu", seed)]
    return p._inpaint_start(req, pixels_, images.mask_array(mask, SIZE, SIZE), gens, plan, fill).x


@pytest.mark.parametrize("which", ["4", "9"])
def test_latent_fills(pipe, inpaint_pipe, mask_image, which):
    """A1111: "latent nothing" zeroes the masked image latents, "latent noise" puts there the first normal draw
    of the seed (torch.randn with a CPU generator); the unmasked latents stay the image's."""
    p = pipe if which == "4" else inpaint_pipe
    m = np.asarray(mask_image)[::8, ::8] > 127
    original, nothing, noise = (start_latents(p, f, mask_image) for f in ("original", "latent nothing", "latent noise"))
    assert np.array_equal(original[..., ~m], nothing[..., ~m]) and np.array_equal(original[..., ~m], noise[..., ~m])
    assert np.abs(original[..., m] - nothing[..., m]).min() > 0            # the image latents were there
    drawn = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(4)).numpy()
    np.testing.assert_allclose((noise - nothing)[..., m], drawn[..., m], atol=1e-5)


def test_fill_paints_the_masked_area_from_its_surroundings(pipe, init_image, mask_image):
    filled = np.asarray(masking.fill(init_image, mask_image), np.int16)
    keep = np.asarray(mask_image) == 0
    assert np.array_equal(filled[keep], np.asarray(init_image, np.int16)[keep])
    # blurred colours: far smoother inside than the noisy blue channel of the image
    inside = filled[20:44, 12:36, 2]
    assert np.abs(np.diff(inside, axis=1)).mean() < 0.2 * np.abs(np.diff(np.asarray(init_image, np.int16)[..., 2],
                                                                           axis=1)).mean()
    kw = dict(steps=2, seed=1, strength=0.7)
    ours = pipe.inpaint(init_image, mask_image, PROMPT, fill="fill", **kw)
    assert np.array_equal(pixels(ours), pixels(pipe.inpaint(Image.fromarray(filled.astype(np.uint8)), mask_image,
                                                            PROMPT, **kw)))
    assert "Masked content: fill" in ours.infotexts[0]


def test_img2img_resize_modes(pipe, big_image):
    kw = dict(steps=2, seed=2, strength=0.6, width=SIZE, height=SIZE)
    for mode in (1, 2):
        ours = pipe.img2img(big_image, PROMPT, resize_mode=mode, **kw)
        fitted = images.resize_image(big_image, mode, SIZE, SIZE)
        assert np.array_equal(pixels(ours), pixels(pipe.img2img(fitted, PROMPT, **kw)))
    assert np.array_equal(pixels(pipe.img2img(big_image, PROMPT, resize_mode="Just resize", **kw)),
                          pixels(pipe.img2img(big_image, PROMPT, **kw)))


def test_latent_upscale_matches_diffusers(pipe, tiny_model_dir, big_image):
    """resize_mode 3: encode at 96x80, resize the latents bilinearly to 64x64 (A1111), then img2img; the
    reference feeds diffusers' img2img the torch VAE's latents interpolated by torch, same generator."""
    ours = pipe.img2img(big_image, PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="Euler", seed=8,
                        strength=0.6, width=SIZE, height=SIZE, resize_mode=3)
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(8)
    x = torch.from_numpy(images.to_array(big_image, 96, 80))
    with torch.no_grad():
        latents = ref.vae.encode(x).latent_dist.sample(g) * ref.vae.config.scaling_factor
    latents = torch.nn.functional.interpolate(latents, size=(SIZE // 8, SIZE // 8), mode="bilinear")
    out = ref(prompt=PROMPT, negative_prompt=NEGATIVE, image=latents, strength=0.6, num_inference_steps=STEPS,
              guidance_scale=7.5, generator=[g], output_type="np").images
    compare("img2img[resize_mode 3]", ours, (out * 255).round().astype(np.int16))


def test_bad_options(pipe, big_image, small_mask):
    with pytest.raises(InvalidRequest, match="inpainting fill"):
        pipe.inpaint(big_image, small_mask, PROMPT, fill=5, width=SIZE, height=SIZE)
    with pytest.raises(InvalidRequest, match="resize_mode 3"):
        pipe.inpaint(big_image, small_mask, PROMPT, resize_mode=3, width=SIZE, height=SIZE)
    with pytest.raises(InvalidRequest, match="resize_mode"):
        pipe.img2img(big_image, PROMPT, resize_mode="stretch", width=SIZE, height=SIZE)
    with pytest.raises(InvalidRequest, match="multiple of 8"):
        pipe.img2img(big_image.crop((0, 0, 90, 80)), PROMPT, resize_mode=3, width=SIZE, height=SIZE)
