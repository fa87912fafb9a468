"""Which model family a source is, so that the user never names the architecture.

A diffusers folder is read from its configs (``model_index.json``, the UNet's ``cross_attention_dim``,
``addition_embed_type``, ``in_channels`` and ``time_cond_proj_dim``, the text encoder's class and activation,
the scheduler's ``prediction_type``); a single-file checkpoint from the names and shapes of its weights
(after diffusers' ``single_file_utils.infer_diffusers_model_type``, reduced to the families told apart here):

    sd1   model.diffusion_model.* + cond_stage_model.transformer.*  (OpenAI CLIP ViT-L, 768 wide)
    sd2   model.diffusion_model.* + cond_stage_model.model.*        (OpenCLIP ViT-H, 1024-wide attention)
    sdxl  conditioner.embedders.*                                   (two text encoders)

A 9-channel ``input_blocks.0.0.weight`` is an inpainting model. An SD 2 file rarely states whether it
predicts v or epsilon; the loaded UNet then answers A1111's probe (:func:`predicts_v`). Families sdrt cannot
export yet get an ``ExportError`` naming the family.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError

SUPPORTED = ("sd1", "sd2", "sdxl", "sdxl-refiner")
NAMES = {
    "sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
    "sdxl-refiner": "the Stable Diffusion XL refiner", "sd3": "Stable Diffusion 3", "flux": "Flux",
    "kandinsky": "Kandinsky", "cascade": "Stable Cascade", "pixart": "PixArt", "deepfloyd-if": "DeepFloyd IF",
    "upscaler": "the Stable Diffusion x4 upscaler", "instruct-pix2pix": "InstructPix2Pix",
    "depth": "Stable Diffusion 2 depth-to-image",
}
OTHER_INPUTS = {5: "depth", 7: "upscaler", 8: "instruct-pix2pix"}     # UNet in_channels of other tasks
TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
                "PixArtTransformer2DModel": "pixart"}
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
SDXL_BASE = "conditioner.embedders.1.model."          # CLIP ViT-L at 0, OpenCLIP bigG at 1
SDXL_REFINER = "conditioner.embedders.0.model."       # OpenCLIP bigG alone
SDXL_TEXT = ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",   # ViT-L
             SDXL_REFINER + "token_embedding.weight")
SD2_BASE_STEP = 875000      # global_step of SD 2.0-base (512, epsilon); diffusers' rule for other SD 2 files


@dataclass(frozen=True)
class Detected:
    """What a source is: its family, whether it inpaints, and the prediction type it states (if any)."""
    family: str
    inpaint: bool = False
    prediction_type: str | None = None
    guidance_embedding: bool = False     # an LCM-distilled UNet conditioned on the guidance scale
    detail: str = ""                     # what the family was recognised by, for error messages


def require_supported(detected: Detected, name: str) -> None:
    """Raise an ExportError naming the family when sdrt cannot export it (yet)."""
    family = detected.family
    if family not in SUPPORTED:
        what = NAMES.get(family, family)
        raise ExportError(f"{name}: {what} ({detected.detail}) is not supported; "
                          "sdrt exports Stable Diffusion 1.x, 2.x and XL models")


# -- diffusers folders -------------------------------------------------------------------------------------

def from_folder(folder: Path) -> Detected:
    """Detect the family of a diffusers folder from its JSON configs alone (no weights are read)."""
    folder = Path(folder)
    model_index = read_json(folder / "model_index.json") or {}
    def component(name, file):
        return read_json(folder / name / file) if model_index.get(name, [None])[0] is not None else None
    return from_configs(model_index, component("unet", "config.json"), component("text_encoder", "config.json"),
                        component("scheduler", "scheduler_config.json"),
                        component("transformer", "config.json"))


def from_configs(model_index: Mapping | None, unet: Mapping | None, text_encoder: Mapping | None,
                 scheduler: Mapping | None, transformer: Mapping | None = None) -> Detected:
    """Detect the family from a pipeline's component configs (any may be None when absent)."""
    model_index = model_index or {}
    pipeline = model_index.get("_class_name", "a pipeline")
    prediction = (scheduler or {}).get("prediction_type")
    if unet is None:
        cls = (transformer or {}).get("_class_name") or _class(model_index, "transformer") or pipeline
        return Detected(TRANSFORMERS.get(cls, cls), detail=f"{pipeline} with {cls}")
    inpaint, extra = unet.get("in_channels") == 9, unet.get("addition_embed_type")
    guidance = unet.get("time_cond_proj_dim") is not None
    declared = (text_encoder or {}).get("architectures") or ["CLIPTextModel"]
    text_cls = _class(model_index, "text_encoder") or declared[0]
    if extra == "text_time":
        refiner = _class(model_index, "text_encoder") is None and _class(model_index, "text_encoder_2") is not None
        return Detected("sdxl-refiner" if refiner else "sdxl", inpaint, prediction, guidance,
                        f"{pipeline}: UNet addition_embed_type 'text_time'")
    if extra is not None or "movq" in model_index:
        return Detected("kandinsky", detail=f"{pipeline}: UNet addition_embed_type {extra!r}")
    if not text_cls.startswith("CLIPTextModel"):          # DeepFloyd IF's T5, AltDiffusion's XLM-R, ...
        family = "deepfloyd-if" if text_cls.startswith("T5") else f"a model with a {text_cls} text encoder"
        return Detected(family, detail=f"{pipeline}: {text_cls} text encoder")
    channels = unet.get("in_channels")
    if channels in OTHER_INPUTS:
        return Detected(OTHER_INPUTS[channels], detail=f"{pipeline}: UNet in_channels {channels}")
    sd2 = (text_encoder or {}).get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024
    return Detected("sd2" if sd2 else "sd1", inpaint, prediction, guidance,
                    "OpenCLIP text encoder" if sd2 else "CLIP text encoder")


def _class(model_index: Mapping, name: str) -> str | None:
    entry = model_index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None else None


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable config ({e}); check the model folder") from None


# -- single-file checkpoints -------------------------------------------------------------------------------

def from_checkpoint(shapes: Mapping[str, tuple[int, ...]], global_step: int | None = None) -> Detected:
    """Detect the family of an original (LDM/SGM) checkpoint from its weight names and shapes."""
    def has(prefix):
        return any(k.startswith(prefix) for k in shapes)
    unet_in = shapes.get(UNET_IN)
    inpaint = unet_in is not None and unet_in[1] == 9
    vpred = "v_pred" in shapes                  # the marker key some v-prediction checkpoints carry
    if has(SDXL_BASE) or has(SDXL_REFINER):      # epsilon unless marked (v-prediction finetunes carry v_pred)
        family = "sdxl" if has(SDXL_BASE) else "sdxl-refiner"
        return Detected(family, inpaint, "v_prediction" if vpred else "epsilon",
                        detail="conditioner.embedders.* weights")
    for family, marks in (("sd3", ("joint_blocks.0.", "text_encoders.")), ("flux", ("double_blocks.0.",)),
                          ("cascade", ("clip_txt_mapper.", "down_blocks.1.0.channelwise."))):
        if any(has(m) or has("model.diffusion_model." + m) for m in marks):
            return Detected(family, detail=f"{marks[0]}* weights")
    if unet_in is None:
        return Detected("unknown", detail=_not_a_model(shapes))
    if unet_in[1] in OTHER_INPUTS:
        return Detected(OTHER_INPUTS[unet_in[1]], detail=f"UNet input of {unet_in[1]} channels")
    sd2 = SD2_TEXT in shapes or _context_width(shapes) == 1024
    if not sd2:
        return Detected("sd1", inpaint, "v_prediction" if vpred else "epsilon",
                        detail="cond_stage_model.transformer.* (CLIP)")
    # SD 2 files seldom say their prediction type: a v_pred key, SD 2.0-base's global_step, or inpainting
    # (epsilon) do; otherwise None, and the loaded UNet is probed (predicts_v), as A1111 does
    prediction = ("v_prediction" if vpred else "epsilon" if inpaint or global_step == SD2_BASE_STEP else None)
    return Detected("sd2", inpaint, prediction, detail="cond_stage_model.model.* (OpenCLIP)")


def predicts_v(unet) -> bool:
    """Whether a trained SD 2 UNet predicts v rather than epsilon: A1111's test
    (``is_using_v_parameterization_for_sd2``). At t=999 on a constant 0.5 input, an epsilon model returns
    about the input; a v model returns about -x0, far below it. Meaningful for trained weights only."""
    import torch
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
    with torch.no_grad():
        out = unet(x, torch.tensor([999]), context, return_dict=False)[0]
    return (out - x[:, :out.shape[1]]).mean().item() < -1


def signature(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, int | None, int | None]:
    """(UNet base channels, cross-attention width, text width) of a checkpoint: what picks a config for it
    (SDXL: the width of its first text encoder, CLIP ViT-L, or bigG in the refiner)."""
    text = next((shapes[k] for k in (SD1_TEXT, SD2_TEXT, *SDXL_TEXT) if k in shapes), None)
    return (shapes[UNET_IN][0] if UNET_IN in shapes else None, _context_width(shapes),
            text[1] if text else None)


def _context_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    widths = [s[1] for k, s in shapes.items()
              if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")]
    return widths[0] if widths else None


def _not_a_model(shapes: Mapping[str, tuple[int, ...]]) -> str:
    keys = list(shapes)
    if any(k.startswith(("lora_", "lora_unet_", "lora_te")) or ".lora_" in k or "lora_down" in k for k in keys):
        return "a LoRA, not a model: pass it with --lora at generation time"
    if any(k.startswith("control_model.") for k in keys):
        return "a ControlNet, not a model: pass it with --controlnet"
    if any(k.startswith(("encoder.conv_in.", "first_stage_model.encoder.")) for k in keys):
        return "a VAE alone, not a model"
    return "no model.diffusion_model.* UNet weights: not a Stable Diffusion checkpoint"


def read_checkpoint(path: Path) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """The weight names and shapes of a ``.safetensors``/``.ckpt`` file (the tensors are not loaded) and
    its ``global_step`` when it records one."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="np") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, None
        import torch
        try:
            top = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:     # torch < 1.6's legacy format cannot be memory-mapped
            top = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:   # safetensors and torch.load raise many types for a corrupt or foreign file
        raise ExportError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).strip()[:200]}); "
                          "check the file is complete, or save it as .safetensors") from None
    state = top
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    step = top.get("global_step") if isinstance(top, dict) else None
    return ({k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")},
            int(step) if isinstance(step, int) else None)
