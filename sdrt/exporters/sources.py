"""Load the torch components of a Stable Diffusion model: diffusers folder, hub id or single checkpoint."""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import ExportError
from ..specs import VAE_FACTOR

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError)


@dataclass
class Source:
    """The torch components of a Stable Diffusion model, ready for export."""
    name: str                     # the path or hub id it was loaded from
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: CLIPTokenizer
    scheduler_config: dict        # the scheduler's config, with its ``_class_name``
    tiny_vae: Any = None          # diffusers AutoencoderTiny (TAESD), exported beside the VAE when given

    @property
    def inpaint(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")


def load_source(source: str, config: str | None = None, progress: bool = True) -> Source:
    """Load a diffusers folder, a hub id, or a single ``.safetensors``/``.ckpt`` checkpoint.

    Args:
        source: a folder with ``model_index.json``, a checkpoint file, or a Hugging Face Hub id.
        config: for single files only: a diffusers folder (or hub id) of the same architecture whose
            component configs are used, so that loading works offline.
        progress: let transformers/diffusers show their loading bars.
    """
    with _library_progress(progress):
        return _checked(_load(source, config))


def _load(source: str, config: str | None) -> Source:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ExportError(f"{path} is a folder but not a diffusers model (no model_index.json); "
                              "pass a diffusers folder, a .safetensors/.ckpt file or a hub id")
        return _from_pretrained(str(path), str(path.absolute()), local_files_only=True)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ExportError(f"{path}: no such checkpoint file")
        return _from_single_file(path, config)
    if path.exists():
        raise ExportError(f"{path}: not a model; pass a diffusers folder (with model_index.json), "
                          f"a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint or a hub id")
    if HUB_ID.match(source):
        _fetch_model_index(source)
        return _from_pretrained(source, source)
    raise ExportError(f"{source}: no such file or folder, and not a hub id (owner/name)")


@contextmanager
def _library_progress(enabled: bool):
    """Hide transformers' and diffusers' own loading bars when no progress is wanted."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging
    libraries = [m for m in (transformers_logging, diffusers_logging) if m.is_progress_bar_enabled()]
    if not enabled:
        for m in libraries:
            m.disable_progress_bar()
    try:
        yield
    finally:
        for m in libraries:
            m.enable_progress_bar()


def _fetch_model_index(repo_id: str) -> None:
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download(repo_id, "model_index.json")
    except Exception as e:  # huggingface_hub raises many unrelated types (network, auth, not found)
        raise ExportError(f"{repo_id}: could not fetch model_index.json from the Hugging Face Hub "
                          f"({_first_line(e)}); check the id "
                          "and the network, or download the model and pass its folder") from None


def _from_pretrained(where: str, name: str, **kwargs) -> Source:
    try:
        # load_config returns the raw scheduler_config.json (with _class_name), whatever the class
        scheduler_config = dict(PNDMScheduler.load_config(where, subfolder="scheduler", **kwargs))
        return Source(
            name=name,
            text_encoder=CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **kwargs),
            unet=UNet2DConditionModel.from_pretrained(where, subfolder="unet", **kwargs),
            vae=AutoencoderKL.from_pretrained(where, subfolder="vae", **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **kwargs),
            scheduler_config=_clean(scheduler_config))
    except LOAD_ERRORS as e:
        raise ExportError(f"{name}: could not load a Stable Diffusion component ({_first_line(e)}); "
                          "check that it is a complete diffusers model") from None


def _from_single_file(path: Path, config: str | None) -> Source:
    kwargs = {"config": config} if config else {}
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=config is not None and Path(config).is_dir(), **kwargs)
    except LOAD_ERRORS as e:
        hint = (f"check that {config} is a diffusers folder of the same architecture" if config else
                "give a local diffusers folder of the same architecture (e.g. a downloaded "
                "stable-diffusion-v1-5) as the export config (--config DIR, ExportOptions.config) "
                "so no config has to be fetched from the hub")
        raise ExportError(f"{path}: could not load the single-file checkpoint ({_first_line(e)}); "
                          + hint) from None
    scheduler_config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    return Source(name=str(path.absolute()), text_encoder=pipe.text_encoder, unet=pipe.unet, vae=pipe.vae,
                  tokenizer=pipe.tokenizer, scheduler_config=_clean(scheduler_config))


def load_tiny_vae(where: str, model: Source, progress: bool = True):
    """A diffusers ``AutoencoderTiny`` (TAESD, e.g. ``madebyollin/taesd``) from a folder or hub id, in fp32 eval
    mode, checked against ``model``'s latent space."""
    from diffusers import AutoencoderTiny
    path = Path(where).expanduser()
    if not path.is_dir() and not HUB_ID.match(where):
        raise ExportError(f"--tiny-vae {where}: no such folder, and not a hub id (owner/name); pass an "
                          "AutoencoderTiny folder (config.json + weights) or a hub id such as madebyollin/taesd")
    try:
        with _library_progress(progress):
            vae = AutoencoderTiny.from_pretrained(str(path) if path.is_dir() else where,
                                                  local_files_only=path.is_dir())
    except LOAD_ERRORS as e:
        raise ExportError(f"--tiny-vae {where}: could not load a diffusers AutoencoderTiny ({_first_line(e)}); "
                          "for SD 1.x/2.x use madebyollin/taesd") from None
    config = vae.config
    if config.latent_channels != model.vae.config.latent_channels or config.get("shift_factor", 0.0):
        raise ExportError(f"--tiny-vae {where}: its latent space ({config.latent_channels} channels, shift "
                          f"{config.get('shift_factor', 0.0)}) is not {model.name}'s "
                          f"({model.vae.config.latent_channels} channels, no shift); use the TAESD of this "
                          "model family (madebyollin/taesd for SD 1.x/2.x)")
    if 2 ** (len(config.encoder_block_out_channels) - 1) != VAE_FACTOR:
        raise ExportError(f"--tiny-vae {where}: it does not downsample by {VAE_FACTOR} like the model's VAE")
    if vae.dtype != torch.float32:
        vae.to(torch.float32)
    return vae.eval().requires_grad_(False)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _clean(config: dict) -> dict:
    """A JSON-ready scheduler config: no diffusers bookkeeping keys, lists instead of tuples."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()
            if k not in ("_use_default_values",)}


def _checked(source: Source) -> Source:
    """Put the models in eval/fp32 and reject architectures that are not SD 1.x/2.x."""
    unet = source.unet.config
    if unet.get("addition_embed_type") is not None or unet.in_channels not in (4, 9):
        raise ExportError(f"{source.name}: unsupported UNet (in_channels={unet.in_channels}, "
                          f"addition_embed_type={unet.get('addition_embed_type')}); sdrt exports "
                          "Stable Diffusion 1.x/2.x models (4-channel or 9-channel inpainting)")
    for model in (source.text_encoder, source.unet, source.vae):
        if model.dtype != torch.float32:
            model.to(torch.float32)
        model.eval().requires_grad_(False)
    return source
