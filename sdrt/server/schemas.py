"""Request bodies of A1111's ``/sdapi/v1`` routes, field for field with A1111's names and defaults.

A1111 generates these from its processing dataclasses (``modules/api/models.py``); clients such as
``webuiapi`` send every field, so every field is accepted here, and ``convert`` refuses (422) the values
sdrt cannot honour yet instead of ignoring them.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Processing(BaseModel):
    """The fields txt2img and img2img share (A1111's ``StableDiffusionProcessing`` + API-only extras)."""
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


class Txt2Img(Processing):
    """POST /sdapi/v1/txt2img (``StableDiffusionTxt2ImgProcessingAPI``)."""
    denoising_strength: float | None = 0.75
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2Img(Processing):
    """POST /sdapi/v1/img2img (``StableDiffusionImg2ImgProcessingAPI``)."""
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str


class ProgressRequest(BaseModel):
    """POST /internal/progress: one task's progress (A1111's ``ProgressRequest``)."""
    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


class DetectRequest(BaseModel):
    """POST /controlnet/detect (sd-webui-controlnet); ``controlnet_images`` is what ``webuiapi`` sends."""
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: float = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
