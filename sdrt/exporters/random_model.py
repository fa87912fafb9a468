"""Random-weight Stable Diffusion pipelines of a named architecture, saved in diffusers format.

Tests export a ``tiny`` model (same structure as SD 1.5, a few seconds to build); benchmarks use ``sd15``
(the real SD 1.5 shapes; latency does not depend on weight values). Nothing is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..errors import ExportError

log = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "data" / "clip_tokenizer"

# SD 1.5's scheduler_config.json; PNDM ignores clip_sample but keeps it in its config, as the hub file does
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True,
                      set_alpha_to_one=False, clip_sample=False)

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
}


def build_random_model(out: Path, arch: str = "tiny", *, inpaint: bool = False,
                       prediction_type: str = "epsilon", seed: int = 0,
                       time_cond_proj_dim: int | None = None) -> Path:
    """Write a random-weight StableDiffusionPipeline of architecture ``arch`` to ``out`` (diffusers format).

    Args:
        out: folder to write (created; existing files are overwritten).
        arch: a key of ``ARCHITECTURES`` ("tiny" for tests, "sd15" for benchmarks).
        inpaint: 9-channel UNet input (latents ⊕ mask ⊕ masked-image latents).
        prediction_type: "epsilon" or "v_prediction", stored in the scheduler config.
        seed: torch seed of the random initialisation.
        time_cond_proj_dim: width of the guidance-scale embedding of an LCM-distilled UNet (LCM uses 256).
    """
    if arch not in ARCHITECTURES:
        raise ExportError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    cfg = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=9 if inpaint else 4, out_channels=4,
                                time_cond_proj_dim=time_cond_proj_dim, **cfg["unet"])
    if time_cond_proj_dim is not None:          # at its default init the guidance input barely moves the output
        with torch.no_grad():
            unet.time_embedding.cond_proj.weight.mul_(10.0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, scaling_factor=0.18215, **cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                                **cfg["text"]))
    _trained_like_final_norm(text_encoder)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), unet=unet.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        scheduler=PNDMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    log.info("wrote a random %s model (inpaint=%s, %s) to %s", arch, inpaint, prediction_type, out)
    return out


def build_random_tiny_vae(out: Path, seed: int = 0) -> Path:
    """Write a small random-weight AutoencoderTiny (TAESD's structure: 8x down/upsampling, 4 latent channels,
    scaling factor 1.0) to ``out``, for tests of ``sdrt export --tiny-vae``."""
    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
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
