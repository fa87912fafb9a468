"""``sdrt.load``: an exported folder -> a ready pipeline on the chosen runtime."""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

from . import manifest as mf
from . import runtimes
from .errors import InvalidRequest, ModelFolderError
from .pipelines.control import ControlModels
from .pipelines.pipeline import TILING, Models, StableDiffusion, Variant, Variants
from .pipelines.tokenizer import ClipTokenizer
from .runtimes.base import Timed
from .specs import half, spec_for
from .weights.overrides import WeightOverrides

log = logging.getLogger(__name__)

REQUIRED = ("unet", "vae_decoder")             # and a text encoder: text_encoder, or SDXL's text_encoder_2


def load(folder: str | Path, runtime: str = "auto", precision: str | None = None, threads: int = 0,
         progress: bool = True, verify: bool = True, lora_dir: str | Path | None = None,
         embeddings_dir: str | Path | None = None, **backend_options) -> StableDiffusion:
    """Load an export made by ``sdrt export``.

    Args:
        folder: the exported folder (holds ``sdrt.json``).
        runtime: ``auto`` (the first installed and working of TensorRT, ONNX Runtime on a GPU provider, OpenVINO,
            ONNX Runtime on the CPU) or a backend name, e.g. ``openvino``.
        precision: which build to run (``fp32``/``fp16``/``int8``); None takes the export's own precision when
            built, else the one present (for OpenVINO: the newest ``sdrt build``, else the exported ONNX).
        threads: intra-op threads for the runtime; 0 lets it decide.
        progress: show a progress bar over the denoising steps on a terminal.
        verify: check every file against the sha256 in the manifest (memoised per file).
        lora_dir: where ``pipe.set_loras`` looks LoRA names up (``<name>.safetensors``, A1111's Lora folder).
        embeddings_dir: textual-inversion embeddings to use (A1111's ``embeddings`` folder); see
            ``StableDiffusion.load_embeddings``.
        backend_options: passed to the backend's ``load`` (``providers=``, ``io_binding=``, ``device_id=`` for ONNX
            Runtime, ``device=`` and ``inference_precision=`` f32/bf16/f16 for OpenVINO, ``device=`` and
            ``cuda_graph=`` for TensorRT).
    """
    folder = Path(folder)
    manifest = mf.read(folder, verify=verify)
    backend = runtimes.pick(runtime)
    missing = [c for c in REQUIRED if c not in manifest.components]
    if not {"text_encoder", "text_encoder_2"} & set(manifest.components):
        missing.append("text_encoder")
    if missing:
        raise ModelFolderError(f"{folder}: the export lacks {missing}; re-export the model")
    # a backend with a build step (OpenVINO IR, TensorRT engines) names its newest build's files
    locate = getattr(backend, "artifacts", None)
    try:
        components = locate(folder, manifest, precision) if locate else manifest.components
    except ModelFolderError as e:
        if runtime != "auto" or not getattr(backend, "RUNS_BUILDS_ONLY", False):
            raise
        name = backend.__name__.rsplit(".", 1)[-1]     # TensorRT without engines for this export: the next one
        log.warning("runtime auto: not %s (%s)", name, e)
        backend = runtimes.pick(runtime, exclude=(name,))
        locate = getattr(backend, "artifacts", None)
        components = locate(folder, manifest, precision) if locate else manifest.components
    precisions = {c.precision for c in components.values()}
    if precision is not None and precision not in precisions:
        raise InvalidRequest(f"{folder} has no {precision} build; it holds {sorted(precisions)}")
    pipe = assemble(folder, manifest, backend, components, threads, progress, lora_dir, **backend_options)
    if embeddings_dir is not None:
        pipe.load_embeddings(embeddings_dir)
    return pipe


def assemble(folder: Path, manifest: mf.Manifest, backend, components: dict[str, mf.Component], threads: int = 0,
             progress: bool = True, lora_dir: Path | None = None, **backend_options) -> StableDiffusion:
    """A pipeline over exactly ``components`` run by ``backend`` (used by ``load`` and by the int8 builder,
    which compares the exported fp32 graphs with a build that is not committed yet)."""
    unknown = set(backend_options) - set(inspect.signature(backend.load).parameters)
    if unknown:
        raise InvalidRequest(f"runtime {backend.__name__.rsplit('.', 1)[-1]} takes no {sorted(unknown)} option")
    def load_one(comp: mf.Component, spec, initializers=None):
        spec = half(spec) if comp.precision == "fp16" else spec
        return Timed(backend.load(folder / comp.file, spec, threads=threads, initializers=initializers,
                                  **backend_options))

    arch = manifest.architecture
    loaded = {name: load_one(comp, spec_for(comp, arch)) for name, comp in components.items()}
    tokenizers = {name: ClipTokenizer(folder / name, arch["bos_token_id"], arch["eos_token_id"], arch[pad])
                  for name, pad in (("tokenizer", "pad_token_id"), ("tokenizer_2", "pad_token_id_2"))
                  if (folder / name).is_dir()}
    tokenizer = tokenizers.get("tokenizer") or tokenizers["tokenizer_2"]     # the SDXL refiner has only the 2nd
    variants = _variants(manifest, load_one)
    models = Models(name=Path(manifest.source.rstrip("/")).stem or folder.name, arch=arch,
                    scheduler_config=json.loads((folder / "scheduler.json").read_text()),
                    tokenizer=tokenizer, tokenizer_2=tokenizers.get("tokenizer_2"),
                    control=_control(manifest, load_one, variants), variants=variants,
                    **{"text_encoder": None, **loaded})

    def reload(name: str, values):
        if variants is not None and name in variants.graphs:
            return variants.reload(name, values)
        return load_one(components[name], spec_for(components[name], arch), values)

    # a variant graph follows the LoRAs and weight overrides of the component it stands for
    extra = variants.graphs if variants is not None else {}
    graphs = {name: manifest.components[name].file for name in components}
    graphs |= {name: v.component.file for name, v in extra.items()}
    precisions = {name: comp.precision for name, comp in components.items()}
    precisions |= {name: v.component.precision for name, v in extra.items()}
    weights = WeightOverrides(folder, graphs, precisions, reload, models.name, lora_dir,
                              twins={name: v.stands_for for name, v in extra.items()})
    return StableDiffusion(models, progress=progress, weights=weights)


def _variants(manifest: mf.Manifest, load_one) -> Variants | None:
    """The graphs standing for a component (ONNX files, on any backend), loaded only when used: the UNet taking
    ControlNet residuals and the seamless-tiling graphs."""
    arch = manifest.architecture
    graphs = {name + TILING: Variant(c, spec_for(c, arch), name) for name, c in manifest.tiling.items()}
    if manifest.unet_control is not None:                                        # SD or SDXL
        graphs["unet_control"] = Variant(manifest.unet_control, spec_for(manifest.unet_control, arch), "unet")
    return Variants(graphs, load_one) if graphs else None


def _control(manifest: mf.Manifest, load_one, variants: Variants | None) -> ControlModels | None:
    """The export's ControlNets, loaded (ONNX files, on any backend) only when used."""
    if not manifest.controlnets:
        return None
    return ControlModels(manifest.controlnets, manifest.architecture, load_one, variants)
