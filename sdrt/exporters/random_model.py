"""Random-weight Stable Diffusion pipelines of a named architecture, saved in diffusers format.

Tests export a ``tiny`` model (same structure as SD 1.5, a few seconds to build), ``tiny-sd2`` (SD 2.x's
structure: OpenCLIP-style text encoder with GELU, linear attention projections, head width per block, the
tokenizer padding with "!") and ``tiny-sdxl``/``tiny-sdxl-refiner``; benchmarks use ``sd15``, ``sd21`` or
``sdxl``/``sdxl-refiner`` (the real shapes; latency does not depend on weight values). Nothing is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import ExportError

log = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "data" / "clip_tokenizer"

# SD 1.5's scheduler_config.json; PNDM ignores clip_sample but keeps it in its config, as the hub file does
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True,
                      set_alpha_to_one=False, clip_sample=False)

# SDXL 1.0's scheduler_config.json (EulerDiscreteScheduler, "leading" spacing)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False, sample_max_value=1.0,
                      set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)

ARCHITECTURES = {
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32),
        vae=dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=1,
                 latent_channels=4, sample_size=64,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                  projection_dim=32, hidden_act="quick_gelu"),
    ),
    "sd15": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        vae=dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2,
                 latent_channels=4, sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu"),
    ),
    # SD 2.x in small: OpenCLIP's GELU text encoder, whose pad token is "!" (id 0), linear projections in
    # the transformer blocks and a head count per block (as SD 2's 64-wide heads)
    "tiny-sd2": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True,
                  norm_num_groups=32),
        vae=dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=1,
                 latent_channels=4, sample_size=64,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                  projection_dim=48, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
        pad_token="!",
    ),
    # stabilityai/stable-diffusion-2-1 (768x768, v-prediction); the 512 "base" differs only in sample sizes
    # and prediction type, the 512 inpainting model in its 9 input channels
    "sd21": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=96,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                  upcast_attention=True, norm_num_groups=32),
        vae=dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2,
                 latent_channels=4, sample_size=768,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  projection_dim=512, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
        pad_token="!", prediction_type="v_prediction",
    ),
}
_sd21 = ARCHITECTURES["sd21"]
ARCHITECTURES["sd21-base"] = dict(_sd21, unet=dict(_sd21["unet"], sample_size=64, upcast_attention=False),
                                  vae=dict(_sd21["vae"], sample_size=512), prediction_type="epsilon")

# SDXL: ``text`` is CLIP ViT-L, ``text_2`` OpenCLIP ViT-bigG with projection (the refiner has only text_2);
# the UNet's cross_attention_dim is their widths together, its added embedding takes
# addition_time_embed_dim * time ids (6; refiner 5) + text_2's projection_dim
SDXL_ARCHITECTURES = {
    "tiny-sdxl": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                  transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=32,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=6 * 8 + 40),
        vae=dict(ARCHITECTURES["tiny"]["vae"], scaling_factor=0.13025, force_upcast=True),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                  projection_dim=32, hidden_act="quick_gelu"),
        text_2=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    projection_dim=40, hidden_act="gelu"),
    ),
    "tiny-sdxl-refiner": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                  transformer_layers_per_block=1, use_linear_projection=True, norm_num_groups=32,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  cross_attention_dim=48, projection_class_embeddings_input_dim=5 * 8 + 40),
        vae=dict(ARCHITECTURES["tiny"]["vae"], scaling_factor=0.13025, force_upcast=True),
        text_2=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    projection_dim=40, hidden_act="gelu"),
    ),
    "sdxl": dict(               # stabilityai/stable-diffusion-xl-base-1.0
        unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                  use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time",
                  addition_time_embed_dim=256, cross_attention_dim=2048, projection_class_embeddings_input_dim=2816),
        vae=dict(ARCHITECTURES["sd15"]["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text=dict(ARCHITECTURES["sd15"]["text"]),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu"),
    ),
    "sdxl-refiner": dict(       # stabilityai/stable-diffusion-xl-refiner-1.0
        unet=dict(block_out_channels=(384, 768, 1536, 1536), layers_per_block=2, sample_size=128,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4,
                  use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time",
                  addition_time_embed_dim=256, cross_attention_dim=1280, projection_class_embeddings_input_dim=2560),
        vae=dict(ARCHITECTURES["sd15"]["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu"),
    ),
}


def build_random_model(out: Path, arch: str = "tiny", *, inpaint: bool = False,
                       prediction_type: str | None = None, seed: int = 0,
                       time_cond_proj_dim: int | None = None) -> Path:
    """Write a random-weight StableDiffusionPipeline of architecture ``arch`` to ``out`` (diffusers format).

    Args:
        out: folder to write (created; existing files are overwritten).
        arch: a key of ``ARCHITECTURES`` ("tiny", "tiny-sd2" for tests, "sd15", "sd21", "sd21-base" for
            benchmarks) or of ``SDXL_ARCHITECTURES`` ("tiny-sdxl", "tiny-sdxl-refiner", "sdxl", "sdxl-refiner").
        inpaint: 9-channel UNet input (latents ⊕ mask ⊕ masked-image latents).
        prediction_type: "epsilon" or "v_prediction", stored in the scheduler config (default: the
            architecture's own, v-prediction for "sd21", else epsilon).
        seed: torch seed of the random initialisation.
        time_cond_proj_dim: width of the guidance-scale embedding of an LCM-distilled UNet (LCM uses 256).
    """
    if arch in SDXL_ARCHITECTURES:
        return build_random_sdxl(out, arch, inpaint=inpaint, prediction_type=prediction_type or "epsilon",
                                 seed=seed)
    torch.manual_seed(seed)
    pipe = _pipeline(arch, inpaint, prediction_type, time_cond_proj_dim)
    _trained_like_final_norm(pipe.text_encoder)
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    log.info("wrote a random %s model (inpaint=%s, %s) to %s", arch, inpaint,
             pipe.scheduler.config.prediction_type, out)
    return out


def write_configs(out: Path, arch: str, *, inpaint: bool = False, prediction_type: str | None = None) -> Path:
    """Write only the configs and tokenizers of ``arch`` as a diffusers folder (no weights, nothing allocated):
    what ``from_single_file`` needs to load a checkpoint of that architecture offline."""
    with torch.device("meta"):
        pipe = (_sdxl_pipeline(arch, inpaint, prediction_type) if arch in SDXL_ARCHITECTURES
                else _pipeline(arch, inpaint, prediction_type))
    out = Path(out)
    pipe.save_config(out)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(out / name)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).config.save_pretrained(out / name)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).save_pretrained(out / name)
    return out


def _pipeline(arch: str, inpaint: bool, prediction_type: str | None,
              time_cond_proj_dim: int | None = None) -> StableDiffusionPipeline:
    if arch not in ARCHITECTURES:
        raise ExportError(f"unknown architecture {arch!r}; choose one of "
                          f"{sorted(ARCHITECTURES) + sorted(SDXL_ARCHITECTURES)}")
    cfg = ARCHITECTURES[arch]
    prediction_type = prediction_type or cfg.get("prediction_type", "epsilon")
    unet = UNet2DConditionModel(in_channels=9 if inpaint else 4, out_channels=4,
                                time_cond_proj_dim=time_cond_proj_dim, **cfg["unet"])
    if time_cond_proj_dim is not None:          # at its default init the guidance input barely moves the output
        with torch.no_grad():
            unet.time_embedding.cond_proj.weight.mul_(10.0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, scaling_factor=0.18215, **cfg["vae"])
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=CLIPTextModel(text_config(arch)).eval(), unet=unet.eval(),
        tokenizer=tokenizer(arch),
        scheduler=PNDMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def text_config(arch: str) -> CLIPTextConfig:
    """The CLIPTextConfig of ``arch`` (SD 1's OpenAI CLIP token ids unless the architecture sets its own, as
    SD 2's OpenCLIP config does: 0/2/1, which CLIPTextModel only reads for the pooled output)."""
    return _clip_config(**ARCHITECTURES[arch]["text"])


def tokenizer(arch: str) -> CLIPTokenizer:
    """The shipped CLIP BPE; SD 2's tokenizer pads with "!" (id 0) instead of the end token."""
    pad = ARCHITECTURES[arch].get("pad_token")
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, **({"pad_token": pad} if pad else {}))


def _clip_config(**kwargs) -> CLIPTextConfig:
    """A CLIPTextConfig of the shipped vocabulary; ``kwargs`` may set their own token ids."""
    ids = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **{**ids, **kwargs})


def build_random_sdxl(out: Path, arch: str = "tiny-sdxl", *, inpaint: bool = False,
                      prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a random-weight SDXL pipeline (StableDiffusionXLPipeline; a ``*-refiner`` architecture:
    StableDiffusionXLImg2ImgPipeline with text_encoder_2 only and aesthetic-score time ids) to ``out``.

    Both tokenizers are the shipped CLIP BPE; ``tokenizer_2`` pads with "!" (id 0), as SDXL's does.
    """
    torch.manual_seed(seed)
    pipe = _sdxl_pipeline(arch, inpaint, prediction_type)
    for clip in (pipe.text_encoder, pipe.text_encoder_2):
        if clip is not None:
            _trained_like_final_norm(clip)
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    log.info("wrote a random %s model (inpaint=%s) to %s", arch, inpaint, out)
    return out


def _sdxl_pipeline(arch: str, inpaint: bool, prediction_type: str | None):
    cfg = SDXL_ARCHITECTURES[arch]
    unet = UNet2DConditionModel(in_channels=9 if inpaint else 4, out_channels=4, **cfg["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, **cfg["vae"])
    text_encoder = CLIPTextModel(_clip_config(**cfg["text"])) if "text" in cfg else None
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(**cfg["text_2"]))
    refiner = text_encoder is None
    with torch.device("cpu"):                   # its sigmas are copied to the CPU: never meta tensors
        scheduler = EulerDiscreteScheduler.from_config({**SDXL_SCHEDULER,
                                                        "prediction_type": prediction_type or "epsilon"})
    parts = dict(vae=vae.eval(), text_encoder=text_encoder and text_encoder.eval(),
                 text_encoder_2=text_encoder_2.eval(), unet=unet.eval(),
                 tokenizer=None if refiner else CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
                 tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"), scheduler=scheduler)
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=False)
    return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)


def build_random_tiny_vae(out: Path, seed: int = 0, full: bool = False) -> Path:
    """Write a small random-weight AutoencoderTiny (TAESD's structure: 8x down/upsampling, 4 latent channels,
    scaling factor 1.0) to ``out``, for tests of ``sdrt export --tiny-vae``; ``full``: TAESD's (and TAESDXL's)
    real widths and depths (diffusers' AutoencoderTiny defaults), for benchmarks."""
    torch.manual_seed(seed)
    small = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                 num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    vae = AutoencoderTiny(latent_channels=4, **({} if full else small))
    with torch.no_grad():                       # fresh weights give latents near 0 and a black image: widen them
        vae.encoder.layers[-1].weight.mul_(10.0)
        vae.decoder.layers[-1].weight.mul_(6.0)
        vae.decoder.layers[-1].bias.fill_(0.5)
    vae.save_pretrained(Path(out), safe_serialization=True)
    return Path(out)


def _trained_like_final_norm(text_encoder: CLIPTextModel) -> None:
    """Give CLIP's final LayerNorm a random affine transform, as trained models have.

    Freshly initialised (weight 1, bias 0), every token's output has mean exactly 0, so A1111's emphasis
    ("restore the mean after weighting") would divide by a rounding error; SD's CLIP has a mean near -0.1.
    """
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(-0.1, 0.2)
