"""OpenVINO backend: each component compiled by ``openvino.Core`` (LATENCY hint, OpenVINO's model cache), and
the builder that converts the exported ONNX graphs to OpenVINO IR, optionally with static shapes.

    sdrt build OUT --backend openvino --static 512x512     # IR in OUT/cache/openvino/<key>/
    sdrt.load("OUT", runtime="openvino")                   # the newest build, else the ONNX files directly
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import manifest as mf
from ..errors import BackendUnavailable, InvalidRequest, ProfileError
from ..specs import SPECS, VAE_FACTOR, ComponentSpec, half
from . import builds
from .base import check_feeds

log = logging.getLogger(__name__)

CACHE = Path("cache") / "openvino"      # build entries, relative to the export folder
MODEL_CACHE = "ov_cache"                # OpenVINO's own compiled-model cache (CACHE_DIR), inside CACHE


def _ov():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("openvino is not installed; `pip install sdrt[openvino]`") from None
    return openvino


def available() -> bool:
    try:
        _ov()
    except BackendUnavailable:
        return False
    return True


@functools.cache
def _core():
    return _ov().Core()


def check_device(device: str) -> None:
    """``device`` is one OpenVINO sees here: CPU, GPU, NPU, or a numbered one such as GPU.1."""
    devices = _core().available_devices
    if device not in devices and device not in {d.split(".")[0] for d in devices}:
        raise BackendUnavailable(f"OpenVINO device {device!r} is not available here; "
                                 f"available: {', '.join(devices)}")


class OvRuntime:
    """A component compiled by ``openvino.Core.compile_model``, served by one InferRequest made once."""

    def __init__(self, path: Path, spec: ComponentSpec, threads: int = 0, device: str = "CPU",
                 cache_dir: Path | None = None):
        check_device(device)
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        if device.startswith("CPU"):    # CPUs with AMX/AVX512-BF16 default to bf16; fp32 matches ONNX Runtime
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self.folder = next((p for p in path.resolve().parents if (p / mf.MANIFEST).is_file()), None)
        cache_dir = cache_dir or _model_cache(self.folder)
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        try:
            self.compiled = _core().compile_model(str(path), device, config)
        except RuntimeError as e:
            raise BackendUnavailable(f"{spec.name}: OpenVINO cannot compile {path.name} for {device}: "
                                     f"{str(e).strip().splitlines()[0]}") from None
        self.spec, self.path, self.device = spec, path, device
        self.request = self.compiled.create_infer_request()
        self.loaded_from_cache = _loaded_from_cache(self.compiled)
        self._inputs = {}                               # name -> (dtype, static shape or None)
        for port in self.compiled.inputs:
            shape = port.get_partial_shape()
            self._inputs[_name(port, spec.inputs)] = (port.get_element_type().to_dtype(),
                                                      tuple(shape.to_shape()) if shape.is_static else None)
        self._outputs = [_name(port, spec.outputs) for port in self.compiled.outputs]
        log.debug("%s: compiled %s for %s (from cache: %s)", spec.name, path.name, device, self.loaded_from_cache)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        cast = {}
        for name, value in feeds.items():
            dtype, static = self._inputs[name]
            cast[name] = np.ascontiguousarray(value, dtype=dtype)
            if static is not None and cast[name].shape != static:
                raise ProfileError(self._misfit(name, cast[name].shape, static))
        result = self.request.infer(cast, share_inputs=True)     # share_outputs=False: outputs are copies
        return {name: result[i] for i, name in enumerate(self._outputs)}

    def _misfit(self, name: str, shape: tuple, static: tuple) -> str:
        symbols = self.spec.input(name).shape
        built, asked = _size(symbols, static), _size(symbols, shape)
        return (f"{self.spec.name}: '{name}' has shape {shape}, but this OpenVINO build is static for "
                f"{static}{f' ({built})' if built else ''}; rebuild with `sdrt build {self.folder or 'OUT'} "
                f"--backend openvino --static {asked or 'WIDTHxHEIGHT'} --batch N` for N images per request "
                "(static builds assume guidance_scale > 1), or build without --static for any size")


def load(path: Path, spec: ComponentSpec, threads: int = 0, device: str = "CPU",
         cache_dir: Path | None = None) -> OvRuntime:
    """Compile ``path`` (OpenVINO IR or ONNX); ``cache_dir`` defaults to the export's cache/openvino/ov_cache."""
    return OvRuntime(Path(path), spec, threads, device, cache_dir)


def _name(port, tensors) -> str:
    """The spec's name for a graph port (OpenVINO may give a tensor several names)."""
    return next((t.name for t in tensors if t.name in port.get_names()), port.get_any_name())


def _size(symbols: tuple, shape: tuple) -> str | None:
    """'WIDTHxHEIGHT' in pixels, from a shape whose symbols hold the image size ("H", "W/8", ...)."""
    px = {s[0]: n * (int(s[2:]) if "/" in s else 1)
          for s, n in zip(symbols, shape) if isinstance(s, str) and s[0] in "HW"}
    return f"{px['W']}x{px['H']}" if len(px) == 2 else None


def _model_cache(folder: Path | None) -> Path | None:
    if folder is None:
        return None
    cache = folder / CACHE / MODEL_CACHE
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:                     # read-only model folder: compile every time
        return None
    return cache


def _loaded_from_cache(compiled) -> bool:
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except RuntimeError:
        return False


# -- built artifacts ------------------------------------------------------------------------------------

def artifacts(folder: Path, manifest: mf.Manifest, precision: str | None = None) -> dict[str, mf.Component]:
    """The components of the newest intact build of this export made with this OpenVINO version, at
    ``precision``, or when None at the export's own precision, else at any; without one, the exported ONNX
    files (OpenVINO reads ONNX; shapes stay dynamic). So an int8 build is run only when asked for by name,
    or when it is the only build."""
    version, sources = _ov().__version__, builds.sources(manifest)

    def find(want):
        return builds.newest(folder, folder / CACHE, lambda r: r.get("version") == version and
                             r.get("sources") == sources and want in (None, r["options"]["precision"]))
    own = min(c.precision for c in manifest.components.values())
    found = find(precision) if precision else (find(own) or find(None))
    if found is None:
        return manifest.components
    entry, record = found
    log.info("openvino: running the build %s (%s)", entry.name, record["options"])
    rel = entry.relative_to(folder)
    return {name: mf.Component(**{**c, "file": str(rel / c["file"])}) for name, c in record["components"].items()}


def build(folder: str | Path, options: builds.BuildOptions, progress: bool = True) -> Path:
    """Convert every exported graph to OpenVINO IR in ``folder/cache/openvino/<key>/`` (reused when already
    built), then compile it once for ``options.device`` so that loads find it in OpenVINO's model cache.

    Returns the entry folder. ``sdrt.load(folder, runtime="openvino")`` runs the newest build.
    """
    ov = _ov()
    folder = Path(folder)
    manifest = mf.read(folder)
    options.check(manifest.architecture.get("vae_factor", VAE_FACTOR))
    check_device(options.device)
    settings = {"precision": _precision(manifest, options.precision),
                "static": list(options.static) if options.static else None,
                "batch": (options.batch or 1) if options.static else None}
    int8 = settings["precision"] == "int8"
    if int8:
        from ..quantize import openvino as quantize
        settings["int8"] = quantize.settings(manifest, options)
    sources = builds.sources(manifest)
    entry = folder / CACHE / builds.entry_key(sources, settings, ov.__version__)
    record = builds.find(folder, entry)
    if record is None:
        with builds.staging(entry.parent, entry.name) as tmp:
            components = {}
            for name, comp in _bar(manifest.components.items(), "openvino: converting", progress):
                _convert(ov, folder / comp.file, tmp / f"{name}.xml", SPECS[comp.spec], manifest.architecture,
                         options)
                components[name] = {"spec": comp.spec, "file": f"{name}.xml", "precision": settings["precision"]}
            record = {"backend": "openvino", "version": ov.__version__, "options": settings, "sources": sources,
                      "components": components}
            if int8:
                record["quality"] = quantize.quantize_build(folder, manifest, tmp, options, progress)
            builds.commit(tmp, entry, record)
    else:
        builds.touch(entry)
    if int8:
        _judge(record["quality"], options)
    for name, comp in _bar(manifest.components.items(), f"openvino: compiling for {options.device}", progress):
        spec = half(SPECS[comp.spec]) if comp.precision == "fp16" else SPECS[comp.spec]
        OvRuntime(entry / f"{name}.xml", spec, device=options.device)
    return entry


def _judge(report: dict, options: builds.BuildOptions) -> None:
    from ..quantize.openvino import describe, warning
    log.info("openvino: %s", describe(report))
    problem = warning(report, options.min_cosine, options.min_psnr)
    if problem:
        log.warning("%s", problem)


def _convert(ov, onnx_path: Path, xml: Path, spec: ComponentSpec, arch: dict, options: builds.BuildOptions):
    model = ov.convert_model(str(onnx_path))
    if options.static is not None:
        width, height = options.static
        model.reshape({k: list(v) for k, v in builds.static_shapes(spec, arch, width, height,
                                                                   options.batch or 1).items()})
    ov.save_model(model, str(xml), compress_to_fp16=False)     # weights keep the export's precision


def _precision(manifest: mf.Manifest, requested: str | None) -> str:
    own = sorted({c.precision for c in manifest.components.values()})
    if requested is None or [requested] == own or (requested == "int8" and own == ["fp32"]):
        return requested or own[0]
    raise InvalidRequest(f"--precision {requested}: this export is {'/'.join(own)}; OpenVINO builds keep the "
                         "export's precision or quantize an fp32 export to int8 (fp16 weights from an fp32 "
                         "export are not implemented yet); export with --fp16 for an fp16 build")


def _bar(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    items = list(items)
    return tqdm(items, desc=desc, unit="component", disable=None if enabled else True, leave=False)
