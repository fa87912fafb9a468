"""Backends behind one ``Runtime`` protocol, imported lazily so a CPU-only install never imports TensorRT."""
from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import BackendUnavailable, InvalidRequest
from .base import Runtime, check_feeds
from .builds import BuildOptions

# Preference of runtime="auto", best first (DESIGN §4: TensorRT > OpenVINO > ONNX Runtime). On a CPU,
# OpenVINO is the faster of the two; a later issue adds "tensorrt" in front.
BACKENDS = ("openvino", "onnxruntime")


def backend(name: str):
    """The backend module ``sdrt.runtimes.<name>``; BackendUnavailable if unknown or not installed."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown runtime {name!r}; this sdrt provides: auto, {', '.join(BACKENDS)}")
    module = importlib.import_module(f"{__package__}.{name}")
    if not module.available():
        raise BackendUnavailable(f"runtime {name!r} is not installed; `pip install sdrt[{name}]`")
    return module


def pick(name: str = "auto"):
    """Resolve ``auto`` to the best installed backend module."""
    if name != "auto":
        return backend(name)
    for candidate in BACKENDS:
        try:
            return backend(candidate)
        except BackendUnavailable:
            continue
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


__all__ = ["Runtime", "check_feeds", "backend", "pick", "build", "BuildOptions", "BACKENDS"]
