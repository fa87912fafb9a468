"""The weight map written beside each exported graph (``sdrt.weights.weight_map``): which ONNX initializer holds
each LoRA-targetable torch parameter, found by content.

The TorchScript exporter keeps Conv and Gemm weights under their parameter names but stores a bias-free
Linear's weight transposed under a generated name (``onnx::MatMul_123``); fp16 exports convert every value.
So each parameter is looked up by the bytes it has in the graph, as is or transposed, after the same fp16
conversion the export applied.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
from collections import defaultdict
from pathlib import Path

import numpy as np
from torch import nn

from ..weights import onnx_file
from ..weights.weight_map import SUFFIX, Entry, canonical, write

log = logging.getLogger(__name__)


def targets(module: nn.Module) -> dict[str, np.ndarray]:
    """LoRA-targetable parameters of an export wrapper (Linear and Conv2d weights, the CLIP token embedding), by
    canonical name relative to the wrapped diffusers/transformers model, as float32 arrays."""
    found = {}
    for path, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) or (isinstance(m, nn.Embedding) and path.endswith("token_embedding")):
            found[canonical(path.partition(".")[2]) + ".weight"] = m.weight.detach().float().numpy()
    return found


def write_weight_map(module: nn.Module, graph: Path, component: str, fp16: bool) -> Path:
    """Write ``<component>.weights.json`` beside ``graph`` for ``module`` (the export wrapper); returns its path.

    A parameter whose values occur in no initializer (not part of this graph, e.g. the VAE decoder in the
    encoder's wrapper) or not unambiguously (two parameters or two initializers with the same bytes) is left
    out, so a LoRA naming it is reported as not matching rather than applied to the wrong weight.
    """
    index = onnx_file.read_index(graph)
    by_content = _initializers_by_content(graph.parent, index)
    hits, holders = {}, defaultdict(list)
    for name, value in targets(module).items():
        stored = _as_stored(value, fp16)
        layouts = [(False, stored)] + ([(True, stored.T)] if stored.ndim == 2 else [])
        found = [(init, transposed) for transposed, v in layouts for init in by_content.get(_content(v), [])]
        if len(found) == 1:
            hits[name] = found[0]
            holders[found[0][0].name].append(name)
        elif found:
            log.warning("%s: %s matches %d initializers; left out of the weight map", component, name, len(found))
    entries = {}
    for name, (init, transposed) in hits.items():
        if len(holders[init.name]) > 1:
            log.warning("%s: %s shares its initializer with %s; left out of the weight map", component, name,
                        holders[init.name])
            continue
        shape = init.shape[::-1] if transposed else init.shape
        entries[name] = Entry(init.name, transposed, shape, init.dtype, init.file, init.offset)
    path = graph.with_suffix(SUFFIX)
    write(path, component, entries)
    log.info("%s: weight map of %d parameters", component, len(entries))
    return path


def _as_stored(value: np.ndarray, fp16: bool) -> np.ndarray:
    if not fp16:
        return value
    from onnxruntime.transformers.float16 import convert_np_to_float16   # the export's own conversion
    return convert_np_to_float16(value)


def _content(value: np.ndarray) -> tuple:
    value = np.ascontiguousarray(value)
    return value.dtype.name, value.shape, hashlib.blake2b(value.data, digest_size=16).digest()


def _initializers_by_content(folder: Path, index: onnx_file.GraphFile) -> dict[tuple, list]:
    found = defaultdict(list)
    files = {}
    try:
        for init in index.initializers.values():
            if init.dtype not in ("float32", "float16"):
                continue
            if init.file not in files:
                with open(folder / init.file, "rb") as f:
                    files[init.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            data = memoryview(files[init.file])[init.offset:init.offset + init.nbytes]
            found[init.dtype, init.shape, hashlib.blake2b(data, digest_size=16).digest()].append(init)
            data.release()
    finally:
        for buf in files.values():
            buf.close()
    return found
