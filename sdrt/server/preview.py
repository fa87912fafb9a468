"""Live previews (A1111's ``live_previews_enable``, ``show_progress_every_n_steps``, ``show_progress_type``):
a step's denoised latents rendered to the image ``/progress`` returns as ``current_image``.

A renderer maps the loaded pipeline and the latents of one job's images (B, 4, h, w), in the UNet's latent
scale, to one PIL image: the image itself, or a grid of the batch (A1111's ``show_progress_grid``). "TAESD"
uses the export's tiny autoencoder when it has one.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

from ..pipelines import images
from .grids import image_grid

# A1111 modules/sd_vae_approx.py ``cheap_approximation`` (SD 1.x and 2.x latents; from
# https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2): latent channel l
# contributes APPROX_CHEAP[l] to (R, G, B) in [-1, 1].
APPROX_CHEAP = np.array([[0.298, 0.207, 0.208],
                         [0.187, 0.286, 0.173],
                         [-0.158, 0.189, 0.264],
                         [-0.184, -0.271, -0.473]], dtype=np.float32)


def approx_cheap(pipe, latents: np.ndarray) -> list[Image.Image]:
    """A fixed linear map latents -> RGB at the latent resolution (1/8 of the image), as A1111's
    "Approx cheap"."""
    if latents.shape[1] != len(APPROX_CHEAP):
        return []
    rgb = np.einsum("blhw,lr->brhw", latents.astype(np.float32), APPROX_CHEAP)
    return images.to_pil(rgb)


def full(pipe, latents: np.ndarray) -> list[Image.Image]:
    """The export's VAE decoder, image by image (what the final image goes through)."""
    decoder, scale = pipe.models.vae_decoder, np.float32(pipe.models.arch["vae_scaling_factor"])
    return [pic for i in range(len(latents))
            for pic in images.to_pil(decoder.run({"latent_sample": latents[i:i + 1] / scale})["sample"])]


def taesd(pipe, latents: np.ndarray) -> list[Image.Image]:
    """The export's tiny autoencoder (``sdrt export --tiny-vae``), at the image's size; "Approx cheap" for an
    export without one (A1111 would download TAESD; sdrt does not fetch weights while serving)."""
    return pipe.preview(latents) if pipe.has_tiny_vae else approx_cheap(pipe, latents)


RENDERERS: dict[str, Callable[[object, np.ndarray], list[Image.Image]]] = {
    "Approx cheap": approx_cheap,
    "Full": full,
    "TAESD": taesd,
}


def renderer(settings: dict, pipeline: Callable[[], object]) -> Callable[[np.ndarray], Image.Image | None] | None:
    """The job's preview function under these settings (None when live previews are off); ``pipeline()``
    is the pipeline running the job (called in the worker)."""
    if not settings["live_previews_enable"]:
        return None
    render = RENDERERS[settings["show_progress_type"]]

    def preview(latents: np.ndarray) -> Image.Image | None:
        pics = render(pipeline(), latents)
        if len(pics) <= 1:
            return pics[0] if pics else None
        return image_grid(pics, rows=round(math.sqrt(len(pics))))     # A1111's image_grid with n_rows -1
    return preview
