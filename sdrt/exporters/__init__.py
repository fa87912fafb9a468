"""torch/diffusers -> the sdrt model folder (DESIGN §2). The only package that imports torch.

    manifest = export("path/to/diffusers-model", Path("out"), ExportOptions(fp16=True))
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ExportError
from ..manifest import MANIFEST, Component, Manifest, sha256, write
from ..specs import CLIP_LENGTH, VAE_FACTOR
from .controlnet import export_control, load_controlnets, residual_layout
from .onnx import circular_padding, component_spec, components, export_component, lcm, time_id_count
from .sources import Source, load_source, load_tiny_vae

log = logging.getLogger(__name__)

__all__ = ["ExportOptions", "export"]

TILING = ("unet", "vae_encoder", "vae_decoder")     # the graphs seamless tiling replaces


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    fp16: bool = False              # float16 weights and I/O (an SDXL VAE with force_upcast stays fp32)
    check_parity: bool = True       # compare every component with torch right after exporting it
    overwrite: bool = False         # replace a non-empty OUT
    config: str | None = None       # single-file sources: a diffusers folder of the same architecture
    controlnets: tuple[str, ...] = ()   # "[NAME=]MODEL" each: exported to controlnet/NAME.onnx
    tiling: bool = False            # also the seamless-tiling graphs (circular padding): <name>_tiling.onnx
    tiny_vae: str | None = None     # a tiny autoencoder (TAESD, TAESDXL: AutoencoderTiny folder or hub id): *_tiny.onnx


def export(source: str, out: Path, options: ExportOptions = ExportOptions(),
           progress: bool = True) -> Manifest:
    """Export a Stable Diffusion model to the sdrt folder ``out`` (atomically: all of it or nothing).

    Args:
        source: a diffusers folder, a Hugging Face Hub id, or a single ``.safetensors``/``.ckpt`` file.
        out: the folder to write; it must not exist or be empty unless ``options.overwrite``.
        options: opset, precision, parity check, config folder for single files, ControlNets, tiny VAE.
        progress: show a progress bar over the components.
    """
    out = Path(out)
    _check_out(out, options)
    model = load_source(str(source), options.config, progress)
    if options.tiny_vae is not None:
        model.tiny_vae = load_tiny_vae(options.tiny_vae, model, progress)
    if lcm(model) and options.controlnets:
        raise ExportError(f"{model.name}: ControlNets with an LCM-distilled UNet (time_cond_proj_dim) are not "
                          "supported yet; export without --controlnet, or use LCM-LoRA on the base model")
    controlnets = load_controlnets(options.controlnets, model, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"    # same filesystem: rename is atomic
    try:
        tmp.mkdir()
        manifest = _export_into(tmp, model, options, progress, controlnets)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s", model.name, out)
    return manifest


def _check_out(out: Path, options: ExportOptions) -> None:
    if options.opset < 17:
        raise ExportError(f"opset {options.opset} is not supported; pass --opset 17 or newer")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; choose a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not options.overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another folder or pass --overwrite")


def _export_into(folder: Path, model: Source, options: ExportOptions, progress: bool,
                 controlnets: dict | None = None) -> Manifest:
    """Write every component (and ControlNet), the scheduler and the tokenizer into ``folder``; the manifest last."""
    architecture = architecture_facts(model)
    exported = {}
    bar = tqdm(components(model), desc="export", unit="model", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        fp16 = options.fp16 and not _upcast_vae(model, name)
        export_component(model, name, folder, opset=options.opset, fp16=fp16, check_parity=options.check_parity)
        log.info("%s exported in %.1f s", name, time.perf_counter() - start)
        exported[name] = Component(spec=component_spec(model, name).name, file=f"{name}.onnx",
                                   precision="fp16" if fp16 else "fp32")
    unet_control, nets = None, {}
    if controlnets:
        architecture["control_residuals"] = [list(r) for r in residual_layout(model.unet.config)]
        unet_control, nets = export_control(model, controlnets, folder, opset=options.opset, fp16=options.fp16,
                                            check_parity=options.check_parity)
    tiling = {}
    if options.tiling:
        with circular_padding(model.unet, model.vae):
            for name in TILING:
                stem = f"{name}_tiling"
                fp16 = options.fp16 and not _upcast_vae(model, name)
                export_component(model, name, folder, opset=options.opset, fp16=fp16,
                                 check_parity=options.check_parity, stem=stem)
                tiling[name] = Component(spec=component_spec(model, name).name, file=f"{stem}.onnx",
                                         precision="fp16" if fp16 else "fp32")
    (folder / "scheduler.json").write_text(json.dumps(model.scheduler_config, indent=2, sort_keys=True))
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, model.name, folder / "tokenizer")
    if model.tokenizer_2 is not None:
        save_tokenizer(model.tokenizer_2, model.name, folder / "tokenizer_2")
    files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = Manifest(source=model.name, architecture=architecture, components=exported, files=files,
                        sdrt_version=getattr(sys.modules.get("sdrt"), "__version__", ""),
                        controlnets=nets, unet_control=unet_control, tiling=tiling)
    write(folder, manifest)
    return manifest


def _upcast_vae(model: Source, name: str) -> bool:
    """SDXL's VAE overflows fp16 (``force_upcast`` in its config; diffusers decodes it in fp32): kept fp32.
    The tiny autoencoder (TAESDXL, ``force_upcast`` False) runs in fp16."""
    return model.sdxl and name in ("vae_encoder", "vae_decoder") and model.vae.config.get("force_upcast", True)


def architecture_facts(model: Source) -> dict:
    """What the run-time pipeline needs to know about the model, read from the torch configs.
    ``hidden_size``/``text_layers``/token ids describe the first text encoder present (SDXL's refiner has only
    its second); SDXL adds its own facts (:func:`sdxl_facts`)."""
    unet, vae = model.unet.config, model.vae.config
    text, tok = ((model.text_encoder.config, model.tokenizer) if model.text_encoder is not None else
                 (model.text_encoder_2.config, model.tokenizer_2))
    vae_factor = 2 ** (len(vae.block_out_channels) - 1)
    if vae_factor != VAE_FACTOR:
        raise ExportError(f"{model.name}: the VAE downsamples by {vae_factor}, sdrt supports {VAE_FACTOR}")
    facts = dict(
        latent_channels=vae.latent_channels, unet_in_channels=unet.in_channels,
        vae_scaling_factor=vae.scaling_factor, vae_factor=vae_factor,
        unet_downsample=2 ** (len(unet.block_out_channels) - 1),
        prediction_type=model.prediction_type, cross_attention_dim=unet.cross_attention_dim,
        sample_size=unet.sample_size, text_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        model_max_length=min(tok.model_max_length, CLIP_LENGTH),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        inpaint=model.inpaint)
    if model.tiny_vae is not None:        # TAESD/TAESDXL: 1.0, its latents are the UNet's (not the VAE's scaling)
        facts["tiny_vae_scaling_factor"] = model.tiny_vae.config.scaling_factor
    if model.sdxl:
        return facts | sdxl_facts(model)
    return facts | dict(family=model.detected.family, time_cond_proj_dim=unet.get("time_cond_proj_dim"))


def sdxl_facts(model: Source) -> dict:
    """SDXL's own facts: the second text encoder (the refiner has only that one), the pooled width, the time
    ids, the VAE's fp32 upcast, and the pipeline flags of model_index.json."""
    unet, text_2 = model.unet.config, model.text_encoder_2.config
    widths = ([model.text_encoder.config.hidden_size] if model.text_encoder is not None else []) + [text_2.hidden_size]
    if sum(widths) != unet.cross_attention_dim:
        raise ExportError(f"{model.name}: the text encoders' widths {widths} do not add up to the UNet's "
                          f"cross_attention_dim {unet.cross_attention_dim}")
    return dict(
        family="sdxl", force_upcast=model.vae.config.get("force_upcast", True), text_encoders=len(widths),
        text_layers_2=text_2.num_hidden_layers, hidden_size_2=text_2.hidden_size,
        text_embeds_dim=text_2.projection_dim, addition_time_embed_dim=unet.addition_time_embed_dim,
        time_ids=time_id_count(model), **model.pipeline_config, pad_token_id_2=model.tokenizer_2.pad_token_id)


def save_tokenizer(tokenizer, name: str, folder: Path) -> None:
    """Save a tokenizer with a ``tokenizer.json`` that the ``tokenizers`` library loads at run time."""
    if not getattr(tokenizer, "is_fast", False):          # transformers 4.x slow CLIPTokenizer
        from transformers import CLIPTokenizerFast
        tokenizer.save_pretrained(folder)
        tokenizer = CLIPTokenizerFast.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ExportError(f"{name}: the tokenizer could not be saved as tokenizer.json")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is removed only after that succeeds."""
    if not (tmp / MANIFEST).is_file():
        raise ExportError(f"{tmp}: internal error, the export has no {MANIFEST}")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
