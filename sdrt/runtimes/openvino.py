"""OpenVINO backend: each component compiled by ``openvino.Core`` (LATENCY hint, OpenVINO's model cache), and
the builder that converts the exported ONNX graphs to OpenVINO IR, optionally with static shapes.

    sdrt build OUT --backend openvino --static 512x512     # IR in OUT/cache/openvino/<key>/
    sdrt build OUT --backend openvino --static 512x512 --prompt-chunks 3   # prompts of up to 3 x 77 tokens
    sdrt.load("OUT", runtime="openvino")                   # the newest build, else the ONNX files directly
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import manifest as mf
from ..errors import BackendUnavailable, InvalidRequest, ModelFolderError, ProfileError
from ..specs import CLIP_LENGTH, VAE_FACTOR, ComponentSpec, half, spec_for
from . import builds
from .base import check_feeds

log = logging.getLogger(__name__)

CACHE = Path("cache") / "openvino"      # build entries, relative to the export folder
MODEL_CACHE = "ov_cache"                # OpenVINO's own compiled-model cache (CACHE_DIR), inside CACHE
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")   # OpenVINO's INFERENCE_PRECISION_HINT values


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
    """A component compiled by ``openvino.Core.compile_model``, served by one InferRequest made once.

    ``inference_precision`` is the precision OpenVINO computes in (f32, bf16, f16); None: f32 on a CPU (whose
    plugin otherwise picks bf16 on AVX512-BF16/AMX CPUs; f32 gives ONNX Runtime's image), the device's own
    default elsewhere. A device that lacks it falls back (the CPU runs f16 as bf16 or f32):
    ``self.inference_precision`` holds what the compiled model actually uses.
    """

    def __init__(self, path: Path, spec: ComponentSpec, threads: int = 0, device: str = "CPU",
                 cache_dir: Path | None = None, inference_precision: str | None = None,
                 initializers: Mapping[str, np.ndarray] | None = None):
        check_device(device)
        if inference_precision not in (None, *INFERENCE_PRECISIONS):
            raise InvalidRequest(f"inference precision {inference_precision!r}: OpenVINO computes in "
                                 f"{', '.join(INFERENCE_PRECISIONS)}")
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        if inference_precision or device.startswith("CPU"):
            config["INFERENCE_PRECISION_HINT"] = inference_precision or "f32"
        self.folder = next((p for p in path.resolve().parents if (p / mf.MANIFEST).is_file()), None)
        cache_dir = cache_dir or _model_cache(self.folder)
        if cache_dir is not None and not initializers:  # new weights are compiled afresh, not cached per set
            config["CACHE_DIR"] = str(cache_dir)
        model = with_weights(path, initializers, spec) if initializers else str(path)
        try:
            self.compiled = _core().compile_model(model, device, config)
        except RuntimeError as e:
            raise BackendUnavailable(f"{spec.name}: OpenVINO cannot compile {path.name} for {device}: "
                                     f"{str(e).strip().splitlines()[0]}") from None
        self.spec, self.path, self.device = spec, path, device
        self.request = self.compiled.create_infer_request()
        self.loaded_from_cache = _loaded_from_cache(self.compiled)
        self.inference_precision = _inference_precision(self.compiled)
        self._inputs = {}                               # name -> (dtype, (lowest, highest) shape of a static build)
        for port in self.compiled.inputs:
            self._inputs[_name(port, spec.inputs)] = (port.get_element_type().to_dtype(),
                                                      _bounds(port.get_partial_shape()))
        self.block = self._block_rows()
        self._outputs = [_name(port, spec.outputs) for port in self.compiled.outputs]
        log.debug("%s: compiled %s for %s (from cache: %s)", spec.name, path.name, device, self.loaded_from_cache)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        rows = len(feeds[self.spec.inputs[0].name])
        if self.block and rows > self.block and rows % self.block == 0:    # [uncond; cond]: a call per block
            parts = [self._run({k: v[i:i + self.block] if self.spec.input(k).shape[:1] == ("B",) else v
                                for k, v in feeds.items()}) for i in range(0, rows, self.block)]
            return {name: np.concatenate([p[name] for p in parts]) for name in self._outputs}
        return self._run(feeds)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {}
        for name, value in feeds.items():
            dtype, bounds = self._inputs[name]
            cast[name] = np.ascontiguousarray(value, dtype=dtype)
            if bounds is not None and not _within(cast[name].shape, *bounds):
                raise ProfileError(self._misfit(name, {n: np.shape(v) for n, v in feeds.items()}))
        result = self.request.infer(cast, share_inputs=True)     # share_outputs=False: outputs are copies
        return {name: result[i] for i, name in enumerate(self._outputs)}

    def _misfit(self, name: str, shapes: Mapping[str, tuple]) -> str:
        """The error of a request (input ``shapes``) whose ``name`` does not fit this static build: the shape
        built, in pixels or prompt chunks, and the ``sdrt build`` command of a build that takes the request."""
        symbols, shape, (lo, hi) = self.spec.input(name).shape, tuple(shapes[name]), self._inputs[name][1]
        built = _size(symbols, lo) or self._prompt(symbols, hi)
        sized = next((t for t in self.spec.inputs if t.name in shapes and _size(t.shape, shapes[t.name])), None)
        asked = _size(sized.shape, shapes[sized.name]) if sized else None
        command, chunks = f"sdrt build {self.folder or 'OUT'} --backend openvino", self._chunks(shapes)
        rows = shape[0] if symbols[:1] == ("B",) else 1
        first = self._inputs[self.spec.inputs[0].name][1]
        if chunks > 1:                  # a --prompt-chunks build: one row per image, with guidance or without
            images = rows // 2 if self.spec.name in builds.GUIDED and not self.block and rows % 2 == 0 else rows
            rebuild = f"`{command} --static {asked or 'WIDTHxHEIGHT'} --batch {images} --prompt-chunks {chunks}`"
        else:
            rebuild = builds.static_rebuild(command, self.spec.name, rows, asked)
        if self.spec.name in builds.GUIDED and first and 2 * rows == first[1][0] and not self.block:
            rebuild += (f"; or, when the prompt and the negative prompt differ in 77-token chunks (so run apart, "
                        f"{rows} row{'s' if rows > 1 else ''} a call), `{command} --static {asked or 'WIDTHxHEIGHT'} "
                        f"--batch {rows} --prompt-chunks K` for prompts of up to K chunks")
        ranged = lo if lo == hi else "(" + ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi)) + ")"
        return (f"{self.spec.name}: '{name}' has shape {shape}, but this OpenVINO build is static for "
                f"{ranged}{f' ({built})' if built else ''}; rebuild with {rebuild}; or build without --static "
                "for any size, batch and prompt length")

    def _block_rows(self) -> int | None:
        """The batch of a static UNet or ControlNet built for prompts of several chunks (``--prompt-chunks``,
        whose token axis is a range): one row per image, so a request of k such blocks of rows ([uncond; cond],
        more with AND) runs as k calls, as a prompt and a negative prompt of different lengths do anyway.
        None for every other graph."""
        if self.spec.name not in builds.GUIDED or self.spec.inputs[0].shape[:1] != ("B",):
            return None
        ranged = [b for t in self.spec.inputs if "S" in t.shape and (b := self._inputs[t.name][1])
                  and b[0][t.shape.index("S")] < b[1][t.shape.index("S")]]
        first = self._inputs[self.spec.inputs[0].name][1]
        return first[0][0] if ranged and first and first[0][0] == first[1][0] else None

    def _prompt(self, symbols: tuple, shape: tuple) -> str | None:
        """What the token axis of a UNet or ControlNet input built up to ``shape`` takes, in prompt chunks."""
        if self.spec.name not in builds.DENOISERS or "S" not in symbols:
            return None
        chunks = -(-shape[symbols.index("S")] // CLIP_LENGTH)
        return "prompts of one 77-token chunk" if chunks == 1 else f"prompts of up to {chunks} 77-token chunks"

    def _chunks(self, shapes: Mapping[str, tuple]) -> int:
        """The 77-token prompt chunks a rebuild takes: the request's, or this build's when more."""
        if self.spec.name not in builds.DENOISERS:
            return 1
        tokens = [n for t in self.spec.inputs if "S" in t.shape and t.name in shapes and self._inputs[t.name][1]
                  for n in (shapes[t.name][t.shape.index("S")], self._inputs[t.name][1][1][t.shape.index("S")])]
        return -(-max(tokens, default=CLIP_LENGTH) // CLIP_LENGTH)


def load(path: Path, spec: ComponentSpec, threads: int = 0, device: str = "CPU",
         cache_dir: Path | None = None, inference_precision: str | None = None,
         initializers: Mapping[str, np.ndarray] | None = None) -> OvRuntime:
    """Compile ``path`` (OpenVINO IR or ONNX); ``cache_dir`` defaults to the export's cache/openvino/ov_cache;
    ``inference_precision`` f32 (default on CPU), bf16 or f16; ``initializers`` (ONNX initializer name ->
    value) replace the graph's weights of those names."""
    return OvRuntime(Path(path), spec, threads, device, cache_dir, inference_precision, initializers)


def with_weights(path: Path, values: Mapping[str, np.ndarray], spec: ComponentSpec):
    """The model in ``path`` with the Constants named after these ONNX initializers replaced by ``values``
    (cast to each Constant's element type; the first axis may differ, e.g. a longer token embedding table).

    The exported ONNX and the IR of `sdrt build` keep the initializer names; int8 builds and builds made
    before weight overrides existed do not.
    """
    model = _core().read_model(str(path))
    constants = {name: op for op in model.get_ops() if op.get_type_name() == "Constant"
                 for name in op.output(0).get_names()}
    missing = sorted(set(values) - set(constants))
    if missing:
        raise ModelFolderError(f"{spec.name}: {path} has no weights named {missing[:3]} ({len(missing)} missing), "
                               f"so LoRAs and weight overrides cannot apply to it: delete {path.parent} and "
                               "`sdrt build` again (or load with runtime='onnxruntime')")
    for name, value in values.items():
        old = constants[name]
        new = _ov().op.Constant(np.ascontiguousarray(value, dtype=old.get_element_type().to_dtype()))
        new.set_friendly_name(old.get_friendly_name())
        old.output(0).replace(new.output(0))
    model.validate_nodes_and_infer_types()
    return model


def _name(port, tensors) -> str:
    """The spec's name for a graph port (OpenVINO may give a tensor several names)."""
    return next((t.name for t in tensors if t.name in port.get_names()), port.get_any_name())


def _bounds(shape) -> tuple[tuple, tuple] | None:
    """(lowest, highest) shape of a port whose every axis is fixed or bounded, as in a static build (whose
    token axis may be a range, ``--prompt-chunks``); None when an axis is unbounded (a dynamic graph)."""
    if shape.rank.is_dynamic or any(d.get_max_length() < 0 for d in shape):
        return None
    return tuple(d.get_min_length() for d in shape), tuple(d.get_max_length() for d in shape)


def _within(shape: tuple, lo: tuple, hi: tuple) -> bool:
    return len(shape) == len(lo) and all(a <= n <= b for a, n, b in zip(lo, shape, hi))


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


def _inference_precision(compiled) -> str | None:
    """The precision a compiled model computes in, as OpenVINO names it (f32, bf16, f16); None if unsaid."""
    try:
        return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except RuntimeError:                # a device without the property (NPU)
        return None


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
    ``--precision fp16`` stores fp16 weights (``compress_to_fp16``; a CPU still computes in f32 unless loaded
    with another ``inference_precision``), ``int8`` quantizes (:mod:`sdrt.quantize.openvino`). The precision
    each component compiled to is read back and recorded in ``build.json`` as ``compiled``. ``--static`` fixes
    every input shape (:func:`builds.static_shapes`), bar the UNet's token axis with ``--prompt-chunks K`` > 1.

    Returns the entry folder. ``sdrt.load(folder, runtime="openvino")`` runs the newest build.
    """
    ov = _ov()
    folder = Path(folder)
    manifest = mf.read(folder)
    options.check(manifest.architecture.get("vae_factor", VAE_FACTOR))
    ranged = [flag for flag in options.ranged() if flag != "--prompt-chunks"]
    if ranged:
        raise InvalidRequest(f"{', '.join(ranged)} set TensorRT shape ranges; OpenVINO builds are dynamic, "
                             "or static with --static WIDTHxHEIGHT --batch N --prompt-chunks K")
    if options.prompt_chunks is not None and options.static is None:
        raise InvalidRequest("--prompt-chunks bounds the prompt length of a static build; a dynamic OpenVINO build "
                             "takes prompts of any length: add --static WIDTHxHEIGHT or drop --prompt-chunks")
    if not options.cfg and options.static is None:
        raise InvalidRequest("--no-cfg fixes the UNet's batch of a static build; a dynamic OpenVINO build takes "
                             "any batch: add --static WIDTHxHEIGHT or drop --no-cfg")
    check_device(options.device)
    settings = {"precision": _precision(manifest, options.precision),
                "static": list(options.static) if options.static else None,
                "batch": (options.batch or 1) if options.static else None}
    if not options.cfg:             # recorded only when set, so the builds made before the option keep their key
        settings["cfg"] = False
    if (options.prompt_chunks or 1) > 1:    # likewise: 1 chunk, the default, is the build made before the option
        settings["prompt_chunks"] = options.prompt_chunks
    if settings["precision"] == "fp16" and any(c.precision == "fp16" for c in manifest.components.values()):
        settings["fp16_graphs"] = "widened"     # a new key: builds of fp16 exports made before widen_fp16 are redone
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
                precision = settings["precision"] if options.precision else comp.precision   # SDXL: fp32 VAE
                _convert(ov, folder / comp.file, tmp / f"{name}.xml", spec_for(comp, manifest.architecture),
                         manifest.architecture, options, precision)
                components[name] = {"spec": comp.spec, "file": f"{name}.xml", "precision": precision}
            record = {"backend": "openvino", "version": ov.__version__, "options": settings, "sources": sources,
                      "components": components}
            if int8:
                record["quality"] = quantize.quantize_build(folder, manifest, tmp, options, progress)
            builds.commit(tmp, entry, record)
    else:
        builds.touch(entry)
    if int8:
        from ..quantize.quality import judge
        judge("openvino", record["quality"], options.min_cosine, options.min_psnr)
    computes = {}
    for name, comp in _bar(manifest.components.items(), f"openvino: compiling for {options.device}", progress):
        spec = spec_for(comp, manifest.architecture)
        spec = half(spec) if comp.precision == "fp16" else spec
        computes[name] = OvRuntime(entry / f"{name}.xml", spec, device=options.device).inference_precision
    builds.annotate(entry, "compiled", {"device": options.device, "inference_precision": computes})
    return entry


def _convert(ov, onnx_path: Path, xml: Path, spec: ComponentSpec, arch: dict, options: builds.BuildOptions,
             precision: str):
    """The IR of one component at ``precision`` (fp16: fp16 weights stored compressed, from an fp32 or an fp16
    export)."""
    # read_model keeps every ONNX initializer's name on its Constant, where weight overrides (LoRA) find it;
    # convert_model's offline passes fold and rename them (int8 keeps its IR, which NNCF quantizes)
    model = ov.convert_model(str(onnx_path)) if options.precision == "int8" else _core().read_model(str(onnx_path))
    if precision == "fp16":
        widen_fp16(ov, model)
    if options.static is not None:
        width, height = options.static
        shapes = builds.static_shapes(spec, arch, width, height, options.batch or 1, options.cfg,
                                      options.prompt_chunks or 1)
        model.reshape({k: list(v) for k, v in shapes.items()})     # a (min, max) axis: a bounded range
    ov.save_model(model, str(xml), compress_to_fp16=precision == "fp16")


def widen_fp16(ov, model) -> None:
    """Turn an fp16 graph (``sdrt export --fp16``) into an f32 graph of the same weights, in place, so that
    ``save_model(compress_to_fp16=True)`` stores them as fp16 constants marked for decompression, as OpenVINO's
    own fp16 IR (and Optimum-Intel's) does. The CPU plugin then keeps one working copy of the weights at the
    precision it computes in: the fp16 graph made it materialise f32 constants as well (an SDXL UNet: 18.8 GiB
    after compiling for bf16, against 5.2 GiB plus the 4.8 GiB weights file mapped). Widening fp16 is exact,
    and the casts the export kept around softmax, GroupNorm and the timestep embedding become no-ops."""
    f16 = ov.Type.f16
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Parameter" and op.get_element_type() == f16:
            op.set_element_type(ov.Type.f32)
            continue
        if kind == "Constant" and op.get_element_type() == f16:
            new = ov.op.Constant(op.get_data().astype(np.float32))
        elif kind == "Convert" and op.get_output_element_type(0) == f16:
            new = ov.opset13.convert(op.input_value(0), "f32")
        else:
            continue
        new.set_friendly_name(op.get_friendly_name())
        new.output(0).set_names(op.output(0).get_names())      # weight overrides (LoRA) find Constants by name
        op.output(0).replace(new.output(0))
    model.validate_nodes_and_infer_types()


def _precision(manifest: mf.Manifest, requested: str | None) -> str:
    # an SDXL --fp16 export keeps its VAE fp32 (force_upcast): the export is fp16 all the same
    upcast = manifest.architecture.get("family") == "sdxl" and manifest.architecture.get("force_upcast")
    own = sorted({c.precision for name, c in manifest.components.items()
                  if not (upcast and name.startswith("vae_"))} or {"fp32"})
    if requested is None or [requested] == own or (requested in ("fp16", "int8") and own == ["fp32"]):
        return requested or own[0]
    raise InvalidRequest(f"--precision {requested}: this export is {'/'.join(own)}; OpenVINO builds keep the "
                         "export's precision, or turn an fp32 export into fp16 weights or int8; re-export "
                         "without --fp16 for that")


def _bar(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    items = list(items)
    return tqdm(items, desc=desc, unit="component", disable=None if enabled else True, leave=False)
