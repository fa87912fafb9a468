"""ONNX Runtime backend: one InferenceSession per component, created once per load, and the int8 builder.

    sdrt.load("OUT", runtime="onnxruntime")                 # the exported ONNX files as they are
    sdrt build OUT --backend onnxruntime --precision int8   # QDQ int8 UNet in OUT/cache/onnxruntime/<key>/
    sdrt.load("OUT", runtime="onnxruntime", precision="int8")
    sdrt build OUT --backend onnxruntime --device GPU [--precision fp16]   # fused graphs for the CUDA EP

GPU execution providers (TensorRT EP, CUDA EP) are used when installed AND working: each is probed once with a
one-node graph, and one that fails is left out with its reason logged. On a GPU, inputs and outputs go
through IO binding (inputs copied to the device once per call, outputs allocated there by ONNX Runtime and
copied back). None of the GPU paths were executed on this project's machines (no GPU); IO binding itself is
tested on the CPU provider.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import manifest as mf
from ..errors import BackendUnavailable, InvalidRequest, ModelFolderError
from ..specs import ComponentSpec
from ..weights import onnx_file
from ..weights.onnx_file import _key, _varint
from . import builds
from .base import check_feeds

log = logging.getLogger(__name__)

CACHE = Path("cache") / "onnxruntime"   # build entries, relative to the export folder

# Preferred order when the caller does not name providers; the CPU provider is always last.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider",
                       "OpenVINOExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
DEVICE_OF = {"TensorrtExecutionProvider": "cuda", "CUDAExecutionProvider": "cuda"}   # IO binding's device
TRT_EP_CACHE = CACHE / "tensorrt_ep"    # the TensorRT EP's engines and timing cache
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class OrtOptions:
    providers: tuple[str, ...] | None = None   # None: the best installed, by PROVIDER_PREFERENCE
    threads: int = 0                            # intra-op threads; 0 lets ONNX Runtime decide
    optimization: str = "all"                   # disable | basic | extended | all
    io_binding: bool | None = None              # None: on GPU providers
    device_id: int = 0                          # CUDA device of the GPU providers


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


def choose_providers(requested: tuple[str, ...] | None, installed: list[str],
                     broken: Mapping[str, str] | None = None) -> list[str]:
    """The providers to create a session with: those asked for, else the installed ones by preference, less
    the ``broken`` ones (provider -> why it failed its probe)."""
    broken = broken or {}
    if requested is None:
        return [p for p in PROVIDER_PREFERENCE if p in installed and p not in broken] or ["CPUExecutionProvider"]
    missing = [p for p in requested if p not in installed]
    if missing:
        raise BackendUnavailable(f"ONNX Runtime providers {missing} are not available here; "
                                 f"installed: {installed}")
    failing = {p: broken[p] for p in requested if p in broken}
    if failing:
        raise BackendUnavailable("ONNX Runtime providers cannot run here: "
                                 + "; ".join(f"{p}: {why}" for p, why in failing.items()))
    return list(requested)


def probe_model() -> bytes:
    """A one-node ONNX graph, y = x + x over float[2], written without the onnx package (opset 17)."""
    def field(number: int, payload: bytes) -> bytes:
        return _key(number, 2) + _varint(len(payload)) + payload

    def value_info(name: str) -> bytes:      # ValueInfoProto{name, type{tensor_type{elem_type FLOAT, shape[2]}}}
        dim = field(1, _key(1, 0) + _varint(2))
        return field(1, name.encode()) + field(2, field(1, _key(1, 0) + _varint(1) + field(2, dim)))
    node = field(1, b"x") + field(1, b"x") + field(2, b"y") + field(4, b"Add")
    graph = field(1, node) + field(2, b"probe") + field(11, value_info("x")) + field(12, value_info("y"))
    return _key(1, 0) + _varint(8) + field(8, field(1, b"") + _key(2, 0) + _varint(17)) + field(7, graph)


def probe(ort, provider: str, options: dict | None = None) -> str | None:
    """Why ``provider`` cannot run a graph here (an exception, a silent fall back to CPU, a wrong result), or
    None when it can."""
    try:
        fallback = ["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else []
        session = ort.InferenceSession(probe_model(), providers=[(provider, options or {}), *fallback])
        if session.get_providers()[0] != provider:
            return "ONNX Runtime fell back to the CPU (its log says why: CUDA/cuDNN/TensorRT libraries, driver)"
        x = np.array([1.0, 2.0], np.float32)
        if not np.array_equal(session.run(["y"], {"x": x})[0], 2 * x):
            return "wrong result on a probe graph"
    except Exception as e:                      # whatever the provider raises while starting up
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


@functools.cache
def broken_providers() -> dict[str, str]:
    """GPU providers listed by this ONNX Runtime that fail their probe here, with the reason (logged once)."""
    ort = _ort()
    broken = {}
    for provider in GPU_PROVIDERS:
        if provider in ort.get_available_providers():
            reason = probe(ort, provider)
            if reason is not None:
                log.warning("onnxruntime: %s is installed but cannot run here, leaving it out: %s", provider, reason)
                broken[provider] = reason
    return broken


def gpu_unusable() -> str | None:
    """Why ONNX Runtime cannot run on a GPU here, or None when a GPU provider works (runtime="auto")."""
    ort = _ort()
    listed = [p for p in GPU_PROVIDERS if p in ort.get_available_providers()]
    if not listed:
        return "no GPU execution provider installed (`pip install onnxruntime-gpu`)"
    broken = broken_providers()
    if all(p in broken for p in listed):
        return "; ".join(f"{p}: {broken[p]}" for p in listed)
    return None


def provider_options(provider: str, folder: Path | None, profile: Mapping[str, tuple] | None, fp16: bool,
                     device_id: int = 0) -> dict:
    """Options of a GPU provider: the CUDA EP's device and convolution search, the TensorRT EP's fp16 switch,
    engine and timing caches in the export's cache folder and the shape profile of the component."""
    if provider == "CUDAExecutionProvider":
        return {"device_id": device_id, "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True,
                "arena_extend_strategy": "kSameAsRequested"}
    if provider != "TensorrtExecutionProvider":
        return {}
    options = {"device_id": device_id, "trt_fp16_enable": fp16, "trt_builder_optimization_level": 3}
    if folder is not None:
        cache = str(folder / TRT_EP_CACHE)
        options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}
    if profile:
        for i, corner in enumerate(("min", "opt", "max")):
            options[f"trt_profile_{corner}_shapes"] = ",".join(
                f"{name}:{'x'.join(map(str, shapes[i]))}" for name, shapes in profile.items())
    return options


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
        installed = ort.get_available_providers()
        gpu = any(p in GPU_PROVIDERS for p in (options.providers or installed))   # probed only when they matter
        providers = choose_providers(options.providers, installed, broken_providers() if gpu else None)
        self.spec, self.path = spec, Path(path)
        model, self._replaced = (replace_initializers(ort, so, path, initializers) if initializers
                                 else (str(path), []))
        self.session = ort.InferenceSession(model, sess_options=so,
                                            providers=self._with_options(providers, options.device_id))
        self.providers = self.session.get_providers()
        self._dtypes = {i.name: _np_dtype(i.type) for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.device = DEVICE_OF.get(self.providers[0], "cpu")
        use_binding = options.io_binding if options.io_binding is not None else self.device != "cpu"
        self._binding = self.session.io_binding() if use_binding else None
        self._device_id = options.device_id if self.device != "cpu" else 0
        log.debug("%s: loaded %s with %s", spec.name, path.name, self.providers)

    def _with_options(self, providers: list[str], device_id: int) -> list:
        """Each GPU provider with its options (:func:`provider_options`); the others as they are."""
        if not any(p in GPU_PROVIDERS for p in providers):
            return providers
        folder = next((p for p in self.path.resolve().parents if (p / mf.MANIFEST).is_file()), None)
        if folder is not None and "TensorrtExecutionProvider" in providers:
            try:
                (folder / TRT_EP_CACHE).mkdir(parents=True, exist_ok=True)
            except OSError:             # read-only export: the TensorRT EP rebuilds its engines every session
                folder = None
        fp16 = any(t.dtype == "float16" for t in self.spec.inputs)
        return [(p, provider_options(p, folder, _profile(folder, self.spec), fp16, device_id))
                if p in GPU_PROVIDERS else p for p in providers]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        cast = {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}
        if self._binding is None:
            return dict(zip(self._outputs, self.session.run(self._outputs, cast)))
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in cast.items():
            binding.bind_cpu_input(name, value)            # copied to the provider's device by ONNX Runtime
        for name in self._outputs:
            binding.bind_output(name, self.device, self._device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(self._outputs, binding.copy_outputs_to_cpu()))


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
    if unknown and CACHE.as_posix() in Path(path).as_posix():
        raise InvalidRequest(f"{path.name} is a build whose weights were fused or quantized ({path.parent.name}), "
                             f"so LoRAs and weight overrides cannot apply to it; load with precision= the export's "
                             "own on the CPU, or delete that build")
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


def _profile(folder: Path | None, spec: ComponentSpec) -> dict[str, tuple] | None:
    """The TensorRT EP's shape profile of a component: the default dynamic range of ``sdrt build --backend
    tensorrt`` (:mod:`.trt_build`), from the export's architecture."""
    from . import trt_build
    if folder is None:
        return None
    try:
        arch = mf.read(folder, verify=False).architecture
    except ModelFolderError:
        return None
    shapes = trt_build.shape_range(builds.BuildOptions(backend="tensorrt"),
                                   arch.get("sample_size", 64) * arch.get("vae_factor", 8))
    return trt_build.profile(spec, arch, shapes)


def _np_dtype(onnx_type: str) -> np.dtype:
    return np.dtype({"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                     "tensor(int32)": "int32", "tensor(double)": "float64"}[onnx_type])


def load(path: Path, spec: ComponentSpec, threads: int = 0, providers: tuple[str, ...] | None = None,
         optimization: str = "all", initializers: Mapping[str, np.ndarray] | None = None,
         io_binding: bool | None = None, device_id: int = 0) -> OrtRuntime:
    """A session for ``path``; ``initializers`` (name -> value, any dtype) replace the graph's own;
    ``io_binding`` (default: on GPU providers) binds inputs and outputs to the provider's device."""
    return OrtRuntime(path, spec, OrtOptions(providers, threads, optimization, io_binding, device_id), initializers)


# -- built artifacts ------------------------------------------------------------------------------------

def artifacts(folder: Path, manifest: mf.Manifest, precision: str | None = None) -> dict[str, mf.Component]:
    """The exported components, with those of the newest intact build at ``precision`` made by this ONNX
    Runtime version in their place (an int8 build holds only the UNet). When a GPU provider works here, a GPU
    build (fused graphs, ``--device GPU``) at ``precision`` (None: the export's own) comes first. Otherwise
    None, or the export's own precision: the exported files as they are, so a build runs only when asked for
    by name."""
    own = {c.precision for c in manifest.components.values()}
    version, sources = _ort().__version__, builds.sources(manifest)

    def find(device: str, want: str):
        return builds.newest(folder, folder / CACHE, lambda r: r.get("version") == version and
                             r.get("sources") == sources and r["options"].get("device", "CPU") == device and
                             r["options"]["precision"] == want)
    found = find("GPU", precision or min(own)) if gpu_unusable() is None else None
    if found is None and (precision is None or {precision} == own):
        return manifest.components
    found = found or find("CPU", precision)
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
    if options.static is not None or options.ranged() or not options.cfg:
        raise InvalidRequest("--static, --no-cfg, --min/--opt/--max and --max-batch apply to OpenVINO and TensorRT "
                             "builds; ONNX Runtime builds keep dynamic shapes")
    if options.device.upper() in GPU_DEVICES:
        return build_gpu(folder, manifest, options, progress)
    if options.device.upper() != "CPU":
        raise InvalidRequest(f"--device {options.device}: ONNX Runtime builds for CPU (int8) or GPU (fused graphs)")
    if options.precision != "int8":
        asked = f" at --precision {options.precision}" if options.precision else ""
        raise InvalidRequest(f"runtime 'onnxruntime' has nothing to build for the CPU{asked}: it runs the exported "
                             "ONNX files as they are (`sdrt generate` them directly; `sdrt export --fp16` makes fp16 "
                             "ones); it builds --precision int8, or fused GPU graphs with --device GPU")
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


GPU_DEVICES = ("GPU", "CUDA")


def build_gpu(folder: Path, manifest: mf.Manifest, options: builds.BuildOptions, progress: bool = True) -> Path:
    """The export's graphs fused for the CUDA provider (:mod:`.ort_graphs`), fp16 with ``--precision fp16``,
    into ``folder/cache/onnxruntime/<key>/``; loads take them when a GPU provider works here. Building needs
    no GPU (the fusions are graph rewrites); running them does (NhwcConv, GroupNorm... have CUDA kernels only)."""
    from . import ort_graphs
    own = sorted({c.precision for c in manifest.components.values()})
    prec = options.precision or own[0]
    if [prec] != own and not (prec == "fp16" and own == ["fp32"]):
        raise InvalidRequest(f"--device GPU --precision {prec}: this export is {'/'.join(own)}; GPU graphs keep "
                             "its precision or turn fp32 into fp16 (int8 on a GPU: --backend tensorrt)")
    version = _ort().__version__
    settings = {"precision": prec, "device": "GPU", "fusion": ort_graphs.SCHEME}
    sources = builds.sources(manifest)
    entry = folder / CACHE / builds.entry_key(sources, settings, version)
    if builds.find(folder, entry) is not None:
        builds.touch(entry)
        return entry
    from tqdm.auto import tqdm
    with builds.staging(entry.parent, entry.name) as tmp:
        components, fused = {}, {}
        for name, comp in tqdm(list(manifest.components.items()), desc="onnxruntime: fusing for the GPU",
                               unit="component", disable=None if progress else True, leave=False):
            fused[name] = ort_graphs.fuse(folder / comp.file, tmp / f"{name}.onnx", comp.spec,
                                          fp16=prec == "fp16" and comp.precision == "fp32")
            components[name] = {"spec": comp.spec, "file": f"{name}.onnx", "precision": prec}
        builds.commit(tmp, entry, {"backend": "onnxruntime", "version": version, "options": settings,
                                   "sources": sources, "components": components, "fused": fused})
    return entry
