"""Load the torch components of a Stable Diffusion model: diffusers folder, hub id or single checkpoint."""
from __future__ import annotations

import logging
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderKL, DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import ExportError
from ..specs import VAE_FACTOR
from . import families
from .random_model import ARCHITECTURES, SDXL_ARCHITECTURES, write_configs

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# model_index.json flags of the SDXL pipelines, with StableDiffusionXLPipeline's defaults
SDXL_FLAGS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# the architectures whose configs sdrt writes itself for a single file of that family (released shapes first)
CONFIG_ARCHITECTURES = {"sd1": ("sd15", "tiny"), "sd2": ("sd21", "sd21-base", "tiny-sd2"),
                        "sdxl": ("sdxl", "tiny-sdxl"), "sdxl-refiner": ("sdxl-refiner", "tiny-sdxl-refiner")}
# the diffusers pipeline that loads a single file of each family (the refiner: text_encoder_2 only)
SINGLE_FILE_PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline,
                         "sdxl": StableDiffusionXLPipeline, "sdxl-refiner": StableDiffusionXLImg2ImgPipeline}
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError)


@dataclass
class Source:
    """The torch components of a Stable Diffusion model, ready for export."""
    name: str                     # the path or hub id it was loaded from
    text_encoder: CLIPTextModel | None      # None: the SDXL refiner, which has only text_encoder_2
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: CLIPTokenizer | None
    scheduler_config: dict        # the scheduler's config, with its ``_class_name``
    text_encoder_2: CLIPTextModelWithProjection | None = None    # SDXL: OpenCLIP ViT-bigG with projection
    tokenizer_2: CLIPTokenizer | None = None
    pipeline_config: dict = field(default_factory=dict)           # SDXL: ``SDXL_FLAGS`` of model_index.json
    tiny_vae: Any = None          # diffusers AutoencoderTiny (TAESD), exported beside the VAE when given

    @property
    def sdxl(self) -> bool:
        """An SDXL UNet: pooled text embeddings and size/crop time ids added to its timestep embedding."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def inpaint(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def detected(self) -> families.Detected:
        """The model family, read from the loaded components' configs."""
        encoders = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        index = {name: ["transformers", type(m).__name__] if m is not None else [None, None]
                 for name, m in encoders.items()}
        text = self.text_encoder or self.text_encoder_2
        return families.from_configs(index, self.unet.config, text.config.to_dict(), self.scheduler_config)


def load_source(source: str, config: str | None = None, progress: bool = True) -> Source:
    """Load a diffusers folder, a hub id, or a single ``.safetensors``/``.ckpt`` checkpoint.

    Args:
        source: a folder with ``model_index.json``, a checkpoint file, or a Hugging Face Hub id.
        config: for single files only: a diffusers folder (or hub id) of the same architecture whose
            component configs are used. Without it, sdrt detects the family and writes the configs of
            the released architecture itself (``CONFIG_ARCHITECTURES``), so loading works offline.
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
        families.require_supported(families.from_folder(path), str(path))
        return _from_pretrained(str(path), str(path.absolute()), local_files_only=True)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ExportError(f"{path}: no such checkpoint file")
        return _from_single_file(path, config)
    if path.exists():
        raise ExportError(f"{path}: not a model; pass a diffusers folder (with model_index.json), "
                          f"a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint or a hub id")
    if HUB_ID.match(source):
        index = _fetch_model_index(source)
        detected = _hub_family(source, index)
        if detected is not None:                          # before any weight is downloaded
            families.require_supported(detected, source)
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


def _fetch_model_index(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo_id, "model_index.json"))
    except Exception as e:  # huggingface_hub raises many unrelated types (network, auth, not found)
        raise ExportError(f"{repo_id}: could not fetch model_index.json from the Hugging Face Hub "
                          f"({_first_line(e)}); check the id "
                          "and the network, or download the model and pass its folder") from None


def _hub_family(repo_id: str, index: Path) -> families.Detected | None:
    """Detect a hub model's family from its small config files, fetched into the snapshot of ``index``
    (None when the denoiser's config could not be fetched: the loaded model is checked instead)."""
    from huggingface_hub import hf_hub_download
    model_index = families.read_json(index) or {}
    for name, file in (("unet", "config.json"), ("transformer", "config.json"), ("text_encoder", "config.json"),
                       ("scheduler", "scheduler_config.json")):
        if model_index.get(name, [None])[0] is not None:
            try:
                hf_hub_download(repo_id, f"{name}/{file}", revision=index.parent.name)
            except Exception:  # noqa: BLE001 (a missing config only leaves that fact unknown)
                log.debug("%s: no %s/%s", repo_id, name, file)
    if not any((index.parent / name / "config.json").is_file() for name in ("unet", "transformer")):
        return None
    return families.from_folder(index.parent)


def _from_pretrained(where: str, name: str, **kwargs) -> Source:
    try:
        # load_config returns the raw scheduler_config.json (with _class_name), whatever the class
        scheduler_config = dict(PNDMScheduler.load_config(where, subfolder="scheduler", **kwargs))
        index = dict(DiffusionPipeline.load_config(where, **kwargs))

        def part(cls, subfolder):           # None when model_index.json names no such component
            named = (index.get(subfolder) or [None])[0] is not None
            return cls.from_pretrained(where, subfolder=subfolder, **kwargs) if named else None
        xl = "text_encoder_2" in index
        return Source(
            name=name,
            text_encoder=part(CLIPTextModel, "text_encoder"),
            unet=UNet2DConditionModel.from_pretrained(where, subfolder="unet", **kwargs),
            vae=AutoencoderKL.from_pretrained(where, subfolder="vae", **kwargs),
            tokenizer=part(CLIPTokenizer, "tokenizer"),
            scheduler_config=_clean(scheduler_config),
            text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2") if xl else None,
            tokenizer_2=part(CLIPTokenizer, "tokenizer_2") if xl else None,
            pipeline_config={k: index.get(k, v) for k, v in SDXL_FLAGS.items()} if xl else {})
    except LOAD_ERRORS as e:
        raise ExportError(f"{name}: could not load a Stable Diffusion component ({_first_line(e)}); "
                          "check that it is a complete diffusers model") from None


def _from_single_file(path: Path, config: str | None) -> Source:
    shapes, global_step = families.read_checkpoint(path)
    detected = families.from_checkpoint(shapes, global_step)
    families.require_supported(detected, str(path))
    with tempfile.TemporaryDirectory(prefix="sdrt-config-") as tmp:
        local = config is None or Path(config).is_dir()
        where = config or str(_write_config(path, detected, shapes, Path(tmp)))
        extra = ({} if detected.family.startswith("sdxl") else
                 dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False))
        try:
            pipe = SINGLE_FILE_PIPELINES[detected.family].from_single_file(
                str(path), config=where, local_files_only=local, **extra)
        except LOAD_ERRORS as e:
            hint = (f"check that {config} is a diffusers folder of the same architecture" if config else
                    "give a local diffusers folder of the same architecture as the export config "
                    "(--config DIR, ExportOptions.config)")
            raise ExportError(f"{path}: could not load the single-file checkpoint ({_first_line(e)}); "
                              + hint) from None
    scheduler_config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    if config is None and detected.prediction_type is None:
        scheduler_config["prediction_type"] = _probe_prediction(path, detected, shapes, pipe.unet)
    xl = detected.family.startswith("sdxl")
    return Source(name=str(path.absolute()), text_encoder=pipe.text_encoder, unet=pipe.unet, vae=pipe.vae,
                  tokenizer=pipe.tokenizer, scheduler_config=_clean(scheduler_config),
                  text_encoder_2=pipe.text_encoder_2 if xl else None, tokenizer_2=pipe.tokenizer_2 if xl else None,
                  pipeline_config={k: pipe.config.get(k, v) for k, v in SDXL_FLAGS.items()} if xl else {})


def _probe_prediction(path: Path, detected: families.Detected, shapes: dict, unet) -> str:
    """The prediction type of a file that does not state it, from A1111's probe of the loaded UNet; the
    UNet's sample size follows (SD 2.1: 768 for v, 512 for epsilon)."""
    prediction = "v_prediction" if families.predicts_v(unet) else "epsilon"
    arch = _architecture(path, families.Detected(detected.family, detected.inpaint, prediction), shapes)
    unet.register_to_config(sample_size=ARCHITECTURES[arch]["unet"]["sample_size"])
    log.info("%s: the UNet predicts %s (A1111's v-parameterization test)", path.name, prediction)
    return prediction


def _write_config(path: Path, detected: families.Detected, shapes: dict, folder: Path) -> Path:
    """The diffusers configs of the registered architecture whose shapes the checkpoint has, with the
    detected inpainting and prediction type."""
    arch = _architecture(path, detected, shapes)
    log.info("%s: %s (%s), %s; configs of architecture %r", path.name, families.NAMES[detected.family],
             detected.detail, detected.prediction_type or "prediction type to probe", arch)
    return write_configs(folder, arch, inpaint=detected.inpaint, prediction_type=detected.prediction_type)


def _architecture(path: Path, detected: families.Detected, shapes: dict) -> str:
    """The registered architecture of the checkpoint's shapes (the one whose own prediction type agrees first)."""
    found = families.signature(shapes)
    matches = [a for a in CONFIG_ARCHITECTURES[detected.family] if _signature(_arch(a)) == found]
    if not matches:
        unet, context, text = found
        raise ExportError(f"{path}: a {families.NAMES[detected.family]} checkpoint of shapes sdrt has no config "
                          f"for (UNet width {unet}, cross-attention {context}, text encoder {text}); pass a "
                          "diffusers folder of the same architecture as the export config (--config DIR)")
    return next((a for a in matches if _arch(a).get("prediction_type", "epsilon")
                 == detected.prediction_type), matches[0])


def _arch(name: str) -> dict:
    return ARCHITECTURES.get(name) or SDXL_ARCHITECTURES[name]


def _signature(arch: dict) -> tuple[int, int, int]:
    text = arch.get("text") or arch["text_2"]       # the SDXL refiner has only bigG
    return arch["unet"]["block_out_channels"][0], arch["unet"]["cross_attention_dim"], text["hidden_size"]


def load_tiny_vae(where: str, model: Source, progress: bool = True):
    """A diffusers ``AutoencoderTiny`` (TAESD, e.g. ``madebyollin/taesd``; SDXL's TAESDXL,
    ``madebyollin/taesdxl``) from a folder or hub id, in fp32 eval mode, checked against ``model``'s latent space.
    TAESD and TAESDXL share one architecture (the weights tell them apart), so the family is not checked."""
    from diffusers import AutoencoderTiny
    path = Path(where).expanduser()
    ours = "madebyollin/taesdxl for SDXL" if model.sdxl else "madebyollin/taesd for SD 1.x/2.x"
    if not path.is_dir() and not HUB_ID.match(where):
        raise ExportError(f"--tiny-vae {where}: no such folder, and not a hub id (owner/name); pass an "
                          f"AutoencoderTiny folder (config.json + weights) or a hub id: {ours}")
    try:
        with _library_progress(progress):
            vae = AutoencoderTiny.from_pretrained(str(path) if path.is_dir() else where,
                                                  local_files_only=path.is_dir())
    except LOAD_ERRORS as e:
        raise ExportError(f"--tiny-vae {where}: could not load a diffusers AutoencoderTiny ({_first_line(e)}); "
                          f"use {ours}") from None
    config = vae.config
    if config.latent_channels != model.vae.config.latent_channels or config.get("shift_factor", 0.0):
        raise ExportError(f"--tiny-vae {where}: its latent space ({config.latent_channels} channels, shift "
                          f"{config.get('shift_factor', 0.0)}) is not {model.name}'s "
                          f"({model.vae.config.latent_channels} channels, no shift); use the TAESD of this "
                          f"model family ({ours})")
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
    """Put the models in eval/fp32 and reject architectures that are not SD 1.x/2.x or SDXL."""
    families.require_supported(source.detected, source.name)
    unet = source.unet.config
    xl = source.sdxl and source.text_encoder_2 is not None and source.tokenizer_2 is not None
    if (unet.get("addition_embed_type") is not None and not xl) or unet.in_channels not in (4, 9):
        raise ExportError(f"{source.name}: unsupported UNet (in_channels={unet.in_channels}, "
                          f"addition_embed_type={unet.get('addition_embed_type')}); sdrt exports "
                          "Stable Diffusion 1.x/2.x models (4-channel or 9-channel inpainting) and SDXL "
                          "diffusers folders (with text_encoder_2 and tokenizer_2)")
    if not xl and (source.text_encoder is None or source.tokenizer is None):
        raise ExportError(f"{source.name}: the model has no text_encoder or tokenizer; "
                          "check that it is a complete diffusers model")
    vae = source.vae.config if source.vae is not None else {}
    normalised = [k for k in ("latents_mean", "latents_std") if vae.get(k) is not None]
    if normalised:
        raise ExportError(f"{source.name}: its VAE config sets {' and '.join(normalised)} (latents normalised per "
                          "channel, as Playground v2.5's, which diffusers de-normalises with them before decoding); "
                          "sdrt does not support such models yet and would decode them wrongly")
    for model in (source.text_encoder, source.text_encoder_2, source.unet, source.vae):
        if model is None:
            continue
        if model.dtype != torch.float32:
            model.to(torch.float32)
        model.eval().requires_grad_(False)
    return source
