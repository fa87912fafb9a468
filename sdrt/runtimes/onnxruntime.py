"""ONNX Runtime backend: one InferenceSession per component, created once per load, and the int8 builder.

    sdrt.load("OUT", runtime="onnxruntime")                 # the exported ONNX files as they are
    sdrt build OUT --backend onnxruntime --precision int8   # QDQ int8 UNet in OUT/cache/onnxruntime/<key>/
    sdrt.load("OUT", runtime="onnxruntime", precision="int8")
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import manifest as mf
from ..errors import BackendUnavailable, InvalidRequest, ModelFolderError
from ..specs import ComponentSpec
from ..weights import onnx_file
from . import builds
from .base import check_feeds

log = logging.getLogger(__name__)

CACHE = Path("cache") / "onnxruntime"   # build entries, relative to the export folder

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
    """A component served by ``onnxruntime.InferenceSession``; ``initializers`` (name -> value) replace the
    graph's weights of those names (LoRA, textual inversion)."""

    def __init__(self, path: Path, spec: ComponentSpec, options: OrtOptions = OrtOptions(),
                 initializers: Mapping[str, np.ndarray] | None = None):
        ort = _ort()
        if options.optimization not in OPT_LEVELS:
            raise ValueError(f"optimization must be one of {sorted(OPT_LEVELS)}, not {options.optimization!r}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[options.optimization])
        providers = choose_providers(options.providers, ort.get_available_providers())
        self.spec, self.path = spec, Path(path)
        model, self._replaced = (replace_initializers(ort, so, path, initializers) if initializers
                                 else (str(path), []))
        self.session = ort.InferenceSession(model, sess_options=so, providers=providers)
        self.providers = self.session.get_providers()
        self._dtypes = {i.name: _np_dtype(i.type) for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        log.debug("%s: loaded %s with %s", spec.name, path.name, self.providers)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        cast = {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}
        return dict(zip(self._outputs, self.session.run(self._outputs, cast)))


def replace_initializers(ort, so, path: Path, values: Mapping[str, np.ndarray]) -> tuple[str | bytes, list]:
    """The model to create the session from with ``values`` in place of those initializers (cast to the
    graph's dtypes), and the OrtValues the session keeps using.

    ``SessionOptions.add_initializer`` is not enough: optimizers that read weights while loading (the CPU EP's
    NCHWc Conv transformer, onnxruntime 1.32) still see the file's values. So initializers stored in the graph
    file are replaced in a patched copy of its bytes, and external ones (graphs over 2 GB) by
    ``add_external_initializers``, which swaps them in the graph before it is optimized.
    """
    index = onnx_file.read_index(path)
    unknown = sorted(set(values) - set(index.initializers))
    if unknown:
        raise ModelFolderError(f"{path.name} has no initializers {unknown[:3]}; re-export the model")
    cast = {n: np.ascontiguousarray(v, dtype=index.initializers[n].dtype) for n, v in values.items()}
    external = {n: v for n, v in cast.items() if index.initializers[n].file != path.name}
    kept = [ort.OrtValue.ortvalue_from_numpy(v) for v in external.values()]
    if kept:
        so.add_external_initializers(list(external), kept)
    embedded = {n: v for n, v in cast.items() if n not in external}
    if not embedded:
        return str(path), [*kept, *external.values()]
    if index.external:          # the patched bytes have no path to resolve external data files against
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return onnx_file.patched(index, embedded), [*kept, *external.values()]


def _np_dtype(onnx_type: str) -> np.dtype:
    return np.dtype({"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                     "tensor(int32)": "int32", "tensor(double)": "float64"}[onnx_type])


def load(path: Path, spec: ComponentSpec, threads: int = 0, providers: tuple[str, ...] | None = None,
         optimization: str = "all", initializers: Mapping[str, np.ndarray] | None = None) -> OrtRuntime:
    """A session for ``path``; ``initializers`` (name -> value, any dtype) replace the graph's own."""
    return OrtRuntime(path, spec, OrtOptions(providers, threads, optimization), initializers)


# -- built artifacts ------------------------------------------------------------------------------------

def artifacts(folder: Path, manifest: mf.Manifest, precision: str | None = None) -> dict[str, mf.Component]:
    """The exported components, with those of the newest intact build at ``precision`` made by this ONNX
    Runtime version in their place (an int8 build holds only the UNet). None, or the export's own precision:
    the exported files as they are, so a build runs only when asked for by name."""
    own = {c.precision for c in manifest.components.values()}
    if precision is None or {precision} == own:
        return manifest.components
    version, sources = _ort().__version__, builds.sources(manifest)
    found = builds.newest(folder, folder / CACHE, lambda r: r.get("version") == version and
                          r.get("sources") == sources and r["options"]["precision"] == precision)
    if found is None:
        return manifest.components
    entry, record = found
    log.info("onnxruntime: running the build %s (%s)", entry.name, record["options"])
    rel = entry.relative_to(folder)
    return {**manifest.components,
            **{name: mf.Component(**{**c, "file": str(rel / c["file"])}) for name, c in record["components"].items()}}


def build(folder: str | Path, options: builds.BuildOptions, progress: bool = True) -> Path:
    """Quantize the UNet to int8 (:mod:`sdrt.quantize.onnxruntime`) into ``folder/cache/onnxruntime/<key>/``
    (reused when already built) and log its quality against fp32; returns the entry folder.

    ``sdrt.load(folder, runtime="onnxruntime", precision="int8")`` runs it. Other precisions have nothing to
    build: ONNX Runtime runs the exported graphs as they are.
    """
    folder = Path(folder)
    manifest = mf.read(folder)
    options.check()
    if options.precision != "int8":
        asked = f" at --precision {options.precision}" if options.precision else ""
        raise InvalidRequest(f"runtime 'onnxruntime' has nothing to build{asked}: it runs the exported ONNX files "
                             "as they are (`sdrt generate` them directly; `sdrt export --fp16` makes fp16 ones); "
                             "it builds --precision int8 only")
    if options.static is not None or options.device != "CPU":
        raise InvalidRequest("--static and --device apply to OpenVINO builds; ONNX Runtime builds keep dynamic "
                             "shapes and pick the device by its execution providers when loaded")
    from ..quantize import onnxruntime as quantize
    from ..quantize.quality import judge
    version = _ort().__version__
    settings = {"precision": "int8", "int8": quantize.settings(manifest, options)}
    sources = builds.sources(manifest)
    entry = folder / CACHE / builds.entry_key(sources, settings, version)
    record = builds.find(folder, entry)
    if record is None:
        with builds.staging(entry.parent, entry.name) as tmp:
            components, quality = quantize.quantize_build(folder, manifest, tmp, options, progress)
            record = {"backend": "onnxruntime", "version": version, "options": settings, "sources": sources,
                      "components": components, "quality": quality}
            builds.commit(tmp, entry, record)
    else:
        builds.touch(entry)
    judge("onnxruntime", record["quality"], options.min_cosine, options.min_psnr)
    return entry
