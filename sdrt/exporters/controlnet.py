"""ControlNets: load them (diffusers folder, hub id, single file), export each to ``controlnet/<name>.onnx``
and the UNet variant that takes their residuals to ``unet_control.onnx``, both parity-checked against torch.

    sdrt export MODEL OUT --controlnet canny=lllyasviel/sd-controlnet-canny --controlnet depth=./cn-depth
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import (DIFFUSERS_TO_LDM_MAPPING, LDM_CONTROLNET_KEY,
                                                 convert_controlnet_checkpoint, load_single_file_checkpoint)
from torch import nn

from .. import specs
from ..errors import ExportError
from ..manifest import Component
from .families import read_checkpoint
from .onnx import dims, export_onnx, parity
from .weight_map import write_weight_map
from .sources import HUB_ID, LOAD_ERRORS, SINGLE_FILE_SUFFIXES, Source, _first_line, _library_progress

log = logging.getLogger(__name__)

NAME = re.compile(r"^[\w.-]+$")
Layout = tuple[tuple[int, int], ...]


def parse(argument: str) -> tuple[str, str]:
    """``[NAME=]MODEL`` -> (name, model); the name defaults to MODEL's last path component (no suffix)."""
    name, sep, model = argument.partition("=")
    if not sep or not NAME.match(name):
        name, model = "", argument
    name = name or Path(model.rstrip("/\\")).name
    if Path(name).suffix.lower() in SINGLE_FILE_SUFFIXES:
        name = Path(name).stem
    if not model or not NAME.match(name):
        raise ExportError(f"--controlnet {argument!r}: give [NAME=]MODEL, NAME made of letters, digits, '.', "
                          "'_' or '-' (e.g. canny=lllyasviel/sd-controlnet-canny)")
    return name, model


def residual_layout(config) -> Layout:
    """(channels, latent downsampling) of every down-block residual, then of the mid-block one.

    The order of diffusers' ``down_block_res_samples``: conv_in, then per down block its resnets and its
    downsampler (the last block has none).
    """
    channels = list(config.block_out_channels)
    per_block = config.layers_per_block
    per_block = [per_block] * len(channels) if isinstance(per_block, int) else list(per_block)
    layout = [(channels[0], 1)]
    for i, (c, n) in enumerate(zip(channels, per_block)):
        layout += [(c, 2 ** i)] * n
        if i < len(channels) - 1:
            layout.append((c, 2 ** (i + 1)))
    return tuple(layout + [(channels[-1], 2 ** (len(channels) - 1))])


def load_controlnets(arguments: tuple[str, ...], model: Source, progress: bool = True) -> dict[str, nn.Module]:
    """Load every ``[NAME=]MODEL`` ControlNet and check that it fits ``model``'s UNet."""
    named = [parse(a) for a in arguments]
    names = [name for name, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ExportError(f"--controlnet: the name {twice[0]!r} is given twice; name them NAME=MODEL")
    with _library_progress(progress):
        return {name: _checked(name, _load(where, model), model) for name, where in named}


def _load(where: str, model: Source) -> ControlNetModel:
    path = Path(where).expanduser()
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ExportError(f"{path} is a folder but not a diffusers ControlNet (no config.json)")
            return ControlNetModel.from_pretrained(str(path), local_files_only=True)
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            if not path.is_file():
                raise ExportError(f"{path}: no such ControlNet checkpoint file")
            return _from_single_file(path, model)
        if path.exists() or not HUB_ID.match(where):
            raise ExportError(f"{where}: not a ControlNet; pass a diffusers ControlNet folder (with "
                              f"config.json), a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint or a hub id")
        return ControlNetModel.from_pretrained(where)
    except LOAD_ERRORS as e:
        raise ExportError(f"{where}: could not load the ControlNet ({_first_line(e)}); check that it is a "
                          "ControlNet for this base model (a diffusers folder, hub id or checkpoint)") from None


def _from_single_file(path: Path, model: Source) -> ControlNetModel:
    """An A1111-style ControlNet checkpoint (diffusers keys, or the original ``control_model.*`` layout), with the
    config derived from the base model's UNet (offline); every weight of the ControlNet must be in the file.

    ControlNets copy the encoder half of the UNet they were trained on and take 4-channel latents.
    """
    read_checkpoint(path)                                   # a clear error for a truncated or foreign file
    with torch.device("meta"):                              # the architecture only: no weights to initialise
        derived = ControlNetModel.from_unet(model.unet, load_weights_from_unet=False)
        net = ControlNetModel.from_config({**derived.config, "in_channels": model.vae.config.latent_channels})
    state = _diffusers_keys(load_single_file_checkpoint(str(path)), net.config)
    expected = net.state_dict()
    problems = (("weights missing", sorted(set(expected) - set(state))),
                ("unknown weights", sorted(set(state) - set(expected))),
                ("weights of another shape", [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in
                                              expected.items() if k in state and state[k].shape != v.shape]))
    found = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for what, keys in problems if keys]
    if found:
        raise ExportError(f"{path}: not a ControlNet for {model.name}'s UNet: {'; '.join(found)}; pass a ControlNet "
                          "trained for this base model, in the diffusers or the original ControlNet layout")
    net.load_state_dict(state, assign=True)
    return net


def _diffusers_keys(checkpoint: dict, config) -> dict:
    """diffusers' ``convert_controlnet_checkpoint`` plus what it leaves out (diffusers 0.42): the class or added
    embedding (SDXL's ``label_emb`` -> ``add_embedding``), mapped with diffusers' own key table. A weight the file
    lacks is absent from the result (diffusers maps some to None)."""
    state = dict(convert_controlnet_checkpoint(checkpoint, config))
    ldm = checkpoint if "time_embed.0.weight" in checkpoint else {
        k.removeprefix(LDM_CONTROLNET_KEY): v for k, v in checkpoint.items() if k.startswith(LDM_CONTROLNET_KEY)}
    for kind in ("class_embed_type", "addition_embed_type"):
        if config.get(kind):
            table = DIFFUSERS_TO_LDM_MAPPING["controlnet"][kind].items()
            state.update({new: ldm[old] for new, old in table if old in ldm and new not in state})
    return {k: v for k, v in state.items() if v is not None}


def _checked(name: str, net: ControlNetModel, model: Source) -> ControlNetModel:
    """Reject a ControlNet whose residuals, text width or added conditioning do not match the UNet (e.g. SD 2.x
    on SD 1.x, SD 1.x on SDXL)."""
    cfg, unet = net.config, model.unet.config
    facts = [("residuals", residual_layout(cfg), residual_layout(unet)),
             ("cross_attention_dim", cfg.cross_attention_dim, unet.cross_attention_dim),
             ("latent channels", cfg.in_channels, model.vae.config.latent_channels),
             ("addition_embed_type", cfg.get("addition_embed_type"), unet.get("addition_embed_type")),
             ("projection_class_embeddings_input_dim", cfg.get("projection_class_embeddings_input_dim"),
              unet.get("projection_class_embeddings_input_dim"))]
    wrong = [f"{what} {mine} vs {theirs}" for what, mine, theirs in facts if mine != theirs]
    if wrong:
        raise ExportError(f"ControlNet {name!r} does not fit {model.name}: {'; '.join(wrong)}; "
                          "use a ControlNet trained for this base model (SD 1.x, 2.x or SDXL)")
    return net.float().eval().requires_grad_(False)


class ControlNet(nn.Module):
    """sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale -> the residuals."""

    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale=conditioning_scale, return_dict=False)
        return (*down, mid)


class ControlNetSDXL(ControlNet):
    """An SDXL ControlNet: also SDXL's ``added_cond_kwargs`` (pooled ``text_embeds``, ``time_ids``)."""

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, text_embeds,
                time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale=conditioning_scale, added_cond_kwargs=added,
                                    return_dict=False)
        return (*down, mid)


class UnetControl(nn.Module):
    """The UNet with ControlNet residuals added to its down-block outputs and its mid block."""

    def __init__(self, source: Source):
        super().__init__()
        self.unet = source.unet

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=residuals[:-1],
                         mid_block_additional_residual=residuals[-1], return_dict=False)[0]


class UnetControlSDXL(UnetControl):
    """SDXL's UNet (``text_embeds``, ``time_ids``) with the ControlNet residuals added."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1],
                         return_dict=False)[0]


# the graphs of a family: (spec name, torch module) of the residual UNet, then of each ControlNet
GRAPHS = {False: (("unet_control", UnetControl), ("controlnet", ControlNet)),
          True: (("unet_control_sdxl", UnetControlSDXL), ("controlnet_sdxl", ControlNetSDXL))}


def export_control(model: Source, nets: dict[str, nn.Module], folder: Path, *, opset: int = 17,
                   fp16: bool = False, check_parity: bool = True) -> tuple[Component, dict[str, Component]]:
    """Write ``unet_control.onnx`` and ``controlnet/<name>.onnx`` for each of ``nets`` into ``folder``."""
    layout = residual_layout(model.unet.config)
    precision = "fp16" if fp16 else "fp32"
    (unet_spec, unet_module), (net_spec, net_module) = GRAPHS[model.sdxl]
    unet = unet_module(model)
    _export(unet, specs.unet_control(layout, unet_spec), model, folder / "unet_control.onnx", opset, fp16,
            check_parity)
    write_weight_map(unet, folder / "unet_control.onnx", "unet_control", fp16)     # for LoRAs, as unet.onnx has
    (folder / "controlnet").mkdir()
    components = {}
    for name, net in nets.items():
        file = f"controlnet/{name}.onnx"
        _export(net_module(net), specs.controlnet(layout, net_spec), model, folder / file, opset, fp16, check_parity)
        components[name] = Component(spec=net_spec, file=file, precision=precision)
    return Component(spec=unet_spec, file="unet_control.onnx", precision=precision), components


def _export(module: nn.Module, spec: specs.ComponentSpec, model: Source, path: Path, opset: int, fp16: bool,
            check_parity: bool) -> None:
    """Trace like ``export_component``; the parity check also sees a two-chunk (154-token) prompt."""
    module = module.eval()
    rng = np.random.default_rng(0)
    export_onnx(module, spec, path, spec.sample(rng, **dims(model, "trace")), opset, fp16)
    if check_parity:
        feeds = spec.sample(rng, **dict(dims(model, "check"), S=2 * specs.CLIP_LENGTH))
        diffs = parity(module, specs.half(spec) if fp16 else spec, path, feeds)
        log.info("%s parity: %s", path.name, ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
