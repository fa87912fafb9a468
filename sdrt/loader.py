"""``sdrt.load``: an exported folder -> a ready pipeline on the chosen runtime."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from . import manifest as mf
from . import runtimes
from .errors import InvalidRequest, ModelFolderError
from .pipelines.pipeline import Models, StableDiffusion
from .pipelines.tokenizer import ClipTokenizer
from .runtimes.base import Timed
from .specs import SPECS, half

REQUIRED = ("text_encoder", "unet", "vae_decoder")


def load(folder: str | Path, runtime: str = "auto", precision: str | None = None, threads: int = 0,
         progress: bool = True, verify: bool = True, **backend_options) -> StableDiffusion:
    """Load an export made by ``sdrt export``.

    Args:
        folder: the exported folder (holds ``sdrt.json``).
        runtime: ``auto`` (best installed: OpenVINO, then ONNX Runtime) or a backend name, e.g. ``openvino``.
        precision: which build to run (``fp32``/``fp16``/``int8``); None takes the export's own precision when
            built, else the one present (for OpenVINO: the newest ``sdrt build``, else the exported ONNX).
        threads: intra-op threads for the runtime; 0 lets it decide.
        progress: show a progress bar over the denoising steps on a terminal.
        verify: check every file against the sha256 in the manifest (memoised per file).
        backend_options: passed to the backend's ``load`` (``providers=`` for ONNX Runtime, ``device=`` for
            OpenVINO).
    """
    folder = Path(folder)
    manifest = mf.read(folder, verify=verify)
    backend = runtimes.pick(runtime)
    missing = [c for c in REQUIRED if c not in manifest.components]
    if missing:
        raise ModelFolderError(f"{folder}: the export lacks {missing}; re-export the model")
    # a backend with a build step (OpenVINO IR, TensorRT engines) names its newest build's files
    locate = getattr(backend, "artifacts", None)
    components = locate(folder, manifest, precision) if locate else manifest.components
    precisions = {c.precision for c in components.values()}
    if precision is not None and precision not in precisions:
        raise InvalidRequest(f"{folder} has no {precision} build; it holds {sorted(precisions)}")
    return assemble(folder, manifest, backend, components, threads, progress, **backend_options)


def assemble(folder: Path, manifest: mf.Manifest, backend, components: dict[str, mf.Component], threads: int = 0,
             progress: bool = True, **backend_options) -> StableDiffusion:
    """A pipeline over exactly ``components`` run by ``backend`` (used by ``load`` and by the int8 builder,
    which compares the exported fp32 graphs with a build that is not committed yet)."""
    unknown = set(backend_options) - set(inspect.signature(backend.load).parameters)
    if unknown:
        raise InvalidRequest(f"runtime {backend.__name__.rsplit('.', 1)[-1]} takes no {sorted(unknown)} option")
    loaded = {}
    for name, comp in components.items():
        spec = SPECS[comp.spec] if comp.precision != "fp16" else half(SPECS[comp.spec])
        loaded[name] = Timed(backend.load(folder / comp.file, spec, threads=threads, **backend_options))
    arch = manifest.architecture
    tokenizer = ClipTokenizer(folder / "tokenizer", arch["bos_token_id"], arch["eos_token_id"], arch["pad_token_id"])
    models = Models(name=Path(manifest.source.rstrip("/")).stem or folder.name, arch=arch,
                    scheduler_config=json.loads((folder / "scheduler.json").read_text()),
                    tokenizer=tokenizer, **loaded)
    return StableDiffusion(models, progress=progress)
