"""ONNX Runtime backend: one InferenceSession per component, created once per load."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import BackendUnavailable
from ..specs import ComponentSpec
from .base import check_feeds

log = logging.getLogger(__name__)

# Preferred order when the caller does not name providers; the CPU provider is always last.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider",
                       "OpenVINOExecutionProvider", "CPUExecutionProvider")
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class OrtOptions:
    providers: tuple[str, ...] | None = None   # None: the best installed, by PROVIDER_PREFERENCE
    threads: int = 0                            # intra-op threads; 0 lets ONNX Runtime decide
    optimization: str = "all"                   # disable | basic | extended | all


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed; `pip install sdrt[onnxruntime]`") from None
    return onnxruntime


def available() -> bool:
    try:
        _ort()
    except BackendUnavailable:
        return False
    return True


def choose_providers(requested: tuple[str, ...] | None, installed: list[str]) -> list[str]:
    if requested is None:
        return [p for p in PROVIDER_PREFERENCE if p in installed] or ["CPUExecutionProvider"]
    missing = [p for p in requested if p not in installed]
    if missing:
        raise BackendUnavailable(f"ONNX Runtime providers {missing} are not available here; "
                                 f"installed: {installed}")
    return list(requested)


class OrtRuntime:
    """A component served by ``onnxruntime.InferenceSession``."""

    def __init__(self, path: Path, spec: ComponentSpec, options: OrtOptions = OrtOptions()):
        ort = _ort()
        if options.optimization not in OPT_LEVELS:
            raise ValueError(f"optimization must be one of {sorted(OPT_LEVELS)}, not {options.optimization!r}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[options.optimization])
        providers = choose_providers(options.providers, ort.get_available_providers())
        self.spec = spec
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        self.providers = self.session.get_providers()
        self._dtypes = {i.name: _np_dtype(i.type) for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        log.debug("%s: loaded %s with %s", spec.name, path.name, self.providers)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        cast = {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}
        return dict(zip(self._outputs, self.session.run(self._outputs, cast)))


def _np_dtype(onnx_type: str) -> np.dtype:
    return np.dtype({"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                     "tensor(int32)": "int32", "tensor(double)": "float64"}[onnx_type])


def load(path: Path, spec: ComponentSpec, threads: int = 0, providers: tuple[str, ...] | None = None,
         optimization: str = "all") -> OrtRuntime:
    return OrtRuntime(path, spec, OrtOptions(providers, threads, optimization))
