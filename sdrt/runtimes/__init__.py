"""Backends behind one ``Runtime`` protocol, imported lazily so a CPU-only install never imports TensorRT."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from ..errors import BackendUnavailable, InvalidRequest
from .base import Runtime, check_feeds
from .builds import BuildOptions

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "openvino", "onnxruntime")
# Preference of runtime="auto", best first: TensorRT, then ONNX Runtime on a GPU provider, then OpenVINO (the
# faster of the two on a CPU), then ONNX Runtime on the CPU. Each is taken only if installed AND working here.
AUTO = ("tensorrt", "onnxruntime-gpu", "openvino", "onnxruntime")


def backend(name: str):
    """The backend module ``sdrt.runtimes.<name>``; BackendUnavailable if unknown, not installed, or (TensorRT)
    without a CUDA device."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown runtime {name!r}; this sdrt provides: auto, {', '.join(BACKENDS)}")
    module = importlib.import_module(f"{__package__}.{name}")
    if not module.available():
        reason = module.unusable() if hasattr(module, "unusable") else None
        raise BackendUnavailable(f"runtime {name!r} cannot run here: {reason}" if reason else
                                 f"runtime {name!r} is not installed; `pip install sdrt[{name}]`")
    return module


def pick(name: str = "auto", exclude: tuple[str, ...] = ()):
    """Resolve ``auto`` to the best backend module that is installed and works here (:data:`AUTO`), other than
    the ``exclude`` ones; each one passed over is logged with the reason."""
    if name != "auto":
        return backend(name)
    for candidate in AUTO:
        module_name, _, variant = candidate.partition("-")
        if module_name in exclude:
            continue
        try:
            module = backend(module_name)
            reason = module.gpu_unusable() if variant == "gpu" else None
        except BackendUnavailable as e:
            reason = str(e)
        if reason is None:
            log.info("runtime auto: %s", candidate)
            return module
        log.info("runtime auto: not %s (%s)", candidate, reason)
    raise BackendUnavailable("no runtime installed; `pip install sdrt[onnxruntime]` (or sdrt[openvino])")


def build(folder: str | Path, options: BuildOptions = BuildOptions(), progress: bool = True) -> Path:
    """Build an export for ``options.backend`` into ``folder/cache/<backend>/<key>/``; returns that entry.

    A build with the same options, sources and backend version is reused, not rebuilt.
    """
    module = pick(options.backend)
    if not hasattr(module, "build"):
        raise InvalidRequest(f"runtime {options.backend!r} has nothing to build: it runs the exported ONNX "
                             "files as they are; `sdrt generate` them directly")
    return module.build(folder, options, progress=progress)


__all__ = ["Runtime", "check_feeds", "backend", "pick", "build", "BuildOptions", "BACKENDS", "AUTO"]
