"""Backends behind one ``Runtime`` protocol, imported lazily so a CPU-only install never imports TensorRT."""
from __future__ import annotations

import importlib

from ..errors import BackendUnavailable
from .base import Runtime, check_feeds

# Preference of runtime="auto", best first. Later issues add "tensorrt" and "openvino" modules.
BACKENDS = ("onnxruntime",)


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


__all__ = ["Runtime", "check_feeds", "backend", "pick", "BACKENDS"]
