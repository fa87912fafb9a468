"""Test helper: turn a diffusers SD folder into an A1111-style single-file checkpoint (original LDM keys;
SDXL: Stability's SGM keys, ``conditioner.embedders.*`` for the text encoders).

The inverse of diffusers' ``single_file_utils`` conversion (after diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py and convert_diffusers_to_original_sdxl.py),
generalised to any number of UNet/VAE blocks so the tiny test models convert too.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_TOP = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
            ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
            ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]
VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
            ("to_out.0.", "proj_out.")]


def unet_prefixes(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) of every UNet block."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    pairs = list(UNET_TOP)
    for i in range(n):
        for j in range(per):
            k = (per + 1) * i + j + 1
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1."))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op."))
        for j in range(per + 1):
            k = (per + 1) * i + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1."))
        pairs.append((f"up_blocks.{i}.upsamplers.0.",
                      f"output_blocks.{(per + 1) * i + per}.{2 if up_attn[i] else 1}."))
    pairs += [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
              ("mid_block.resnets.1.", "middle_block.2.")]
    return pairs


def vae_prefixes(config: dict) -> list[tuple[str, str]]:
    n = len(config["block_out_channels"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for i in range(n):
        pairs.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        pairs.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    return pairs


def _rename(key: str, prefixes: list[tuple[str, str]], inner=()) -> str:
    """Swap the block prefix, then (for ResBlocks) the first layer name after it."""
    for new, old in prefixes:
        if key.startswith(new):
            rest = key[len(new):]
            rest = next((o + rest[len(n):] for n, o in inner if rest.startswith(n + ".")), rest)
            return old + rest
    return key


def unet_to_ldm(state: dict, config: dict) -> dict:
    out = {}
    prefixes = unet_prefixes(config)
    for key, value in state.items():
        ldm = _rename(key, prefixes, RESNET if ".resnets." in key else ())
        out["model.diffusion_model." + ldm] = value
    return out


def controlnet_to_ldm(state: dict, config: dict, prefix: str = "control_model.") -> dict:
    """A diffusers ControlNet in the original ControlNet layout (``control_model.*``): the UNet encoder's keys (SDXL's
    ``label_emb`` included), ``input_hint_block`` (the conditioning embedding: convolutions at even indices, SiLUs
    between), ``zero_convs.i.0`` and ``middle_block_out.0``."""
    hints = len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) * 2 - 2
    pairs = [("controlnet_cond_embedding.conv_in.", "input_hint_block.0."),
             ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * hints + 2}."),
             *((f"controlnet_cond_embedding.blocks.{i}.", f"input_hint_block.{2 * i + 2}.") for i in range(hints)),
             *((f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.") for i in range(64)),
             ("controlnet_mid_block.", "middle_block_out.0."),
             *unet_prefixes({**config, "up_block_types": config["down_block_types"]})]     # no up blocks used
    return {prefix + _rename(k, pairs, RESNET if ".resnets." in k else ()): v for k, v in state.items()}


def vae_to_ldm(state: dict, config: dict) -> dict:
    out = {}
    prefixes = vae_prefixes(config)
    for key, value in state.items():
        ldm = _rename(key, prefixes).replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in ldm:
            for new, old in VAE_ATTN:
                ldm = ldm.replace(f".attn_1.{new}", f".attn_1.{old}")
            if value.ndim == 2:                       # LDM's attention projections are 1x1 convs
                value = value[:, :, None, None]
        out["first_stage_model." + ldm] = value
    return out


def text_to_ldm(state: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


OPENCLIP = [("embeddings.token_embedding.weight", "token_embedding.weight"),
            ("embeddings.position_embedding.weight", "positional_embedding"),
            ("final_layer_norm.", "ln_final."), ("encoder.layers.", "transformer.resblocks."),
            ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
            ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj.")]


def text_to_open_clip(state: dict, config: dict, prefix: str = "cond_stage_model.model.") -> dict:
    """A CLIPTextModel in SD 2's OpenCLIP layout (``cond_stage_model.model.*``): fused q/k/v ``in_proj``,
    plus the ``text_projection`` and ``logit_scale`` an SD 2 checkpoint carries (unused by SD). A
    CLIPTextModelWithProjection (SDXL's bigG) keeps its own projection, stored transposed as OpenCLIP does."""
    out = {}
    projection = state.pop("text_projection.weight", None)
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    for key, value in state.items():
        if ".self_attn.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            fused = torch.cat([state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            key, value = key.replace(f"self_attn.q_proj.{kind}", f"attn.in_proj_{kind}"), fused
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        for new, old in OPENCLIP:
            key = key.replace(new, old)
        out[prefix + key] = value
    generator = torch.Generator().manual_seed(0)
    out[prefix + "text_projection"] = (projection.T if projection is not None else
                                       torch.randn(config["hidden_size"], config["projection_dim"], generator=generator))
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def sdxl_text_to_sgm(model_dir: Path, part) -> dict:
    """SDXL's text encoders in SGM's layout; the refiner has only bigG, at ``conditioner.embedders.0``."""
    bigg, bigg_cfg = part("text_encoder_2", "model.safetensors")
    if not (model_dir / "text_encoder").is_dir():
        return text_to_open_clip(bigg, bigg_cfg, "conditioner.embedders.0.model.")
    clip, _ = part("text_encoder", "model.safetensors")
    return {**text_to_ldm(clip, "conditioner.embedders.0.transformer."),
            **text_to_open_clip(bigg, bigg_cfg, "conditioner.embedders.1.model.")}


def to_single_file(model_dir: Path, out: Path) -> Path:
    """Write ``model_dir`` (diffusers format) as one LDM-keyed ``.safetensors`` (or ``.ckpt``) file."""
    def part(name, file):
        return (load_file(model_dir / name / file),
                json.loads((model_dir / name / "config.json").read_text()))
    unet, unet_cfg = part("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_cfg = part("vae", "diffusion_pytorch_model.safetensors")
    if (model_dir / "text_encoder_2").is_dir():                   # SDXL: embedders.0 CLIP ViT-L, .1 bigG
        text = sdxl_text_to_sgm(model_dir, part)
    else:
        text, text_cfg = part("text_encoder", "model.safetensors")
        open_clip = text_cfg["hidden_act"] == "gelu"              # SD 2's text encoder
        text = text_to_open_clip(text, text_cfg) if open_clip else text_to_ldm(text)
    state = {**unet_to_ldm(unet, unet_cfg), **vae_to_ldm(vae, vae_cfg), **text}
    state = {k: v.contiguous() for k, v in state.items()}
    if out.suffix == ".ckpt":
        torch.save({"state_dict": state}, out)
    else:
        save_file(state, out)
    return out
