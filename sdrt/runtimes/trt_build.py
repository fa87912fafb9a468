"""TensorRT engines from the exported ONNX graphs: shape profiles, cache keys and the builder.

    sdrt build OUT --backend tensorrt [--precision fp16|int8] [--static 512x512 --batch 1]
    sdrt build OUT --backend tensorrt --min 256x256 --opt 512x512 --max 1024x1024 --max-batch 4

The profile functions, the build settings and the cache key are pure (numpy-free, TensorRT-free) and tested on
any machine. :func:`build_engine` and :func:`build` need TensorRT and a CUDA GPU: they are written against
TensorRT 10's Python API (``Builder``, ``OnnxParser``, ``IBuilderConfig``, optimization profiles, timing
cache) and have not been executed on this project's machines, which have no GPU.

An entry of ``OUT/cache/tensorrt/<key>/`` holds one ``.engine`` per graph of the export (text encoder, UNet,
VAE, and, when exported, ``unet_control``, the ControlNets and the seamless-tiling graphs). The key covers the
ONNX files' sha256, the precision, every profile, the refit flag, the GPU's name and compute capability and the
TensorRT version: an engine is only valid for the GPU model and TensorRT version that built it.
"""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import manifest as mf
from ..errors import BackendUnavailable, InvalidRequest
from ..specs import ComponentSpec, half, spec_for
from . import builds

log = logging.getLogger(__name__)

CACHE = Path("cache") / "tensorrt"      # build entries, relative to the export folder
SCHEME = "trt-v1"                       # bump when the build recipe changes: part of the cache key
DEFAULT_MIN, DEFAULT_MAX = (256, 256), (1024, 1024)
DEFAULT_MAX_BATCH = 4                   # images per request of a dynamic build
DEFAULT_CHUNKS = 3                      # 77-token prompt chunks of a dynamic build (231 tokens)
REFITTABLE = ("text_encoder", "unet", "unet_control")    # what LoRAs and weight overrides change
OPTIMIZATION_LEVEL = 3                  # TensorRT's default builder optimization level


@dataclass(frozen=True)
class Corner:
    """One corner of a shape range: images per request, image size in pixels, 77-token prompt chunks."""
    batch: int
    width: int
    height: int
    chunks: int = 1


@dataclass(frozen=True)
class ShapeRange:
    """The requests an engine serves, from ``lo`` to ``hi``, tuned for ``opt``; a static build has one corner."""
    lo: Corner
    opt: Corner
    hi: Corner

    @property
    def static(self) -> bool:
        return self.lo == self.hi


@dataclass(frozen=True)
class Gpu:
    """What an engine is specific to: the GPU model (name, compute capability)."""
    index: int
    name: str
    compute_capability: tuple[int, int]


def shape_range(options: builds.BuildOptions, native: int) -> ShapeRange:
    """The range ``sdrt build`` options ask for: ``--static WxH --batch N`` one corner, else
    ``--min/--opt/--max WxH --max-batch N --prompt-chunks K`` (defaults 256, native, 1024, 4, 3)."""
    if options.static is not None:
        corner = Corner(options.batch or 1, *options.static, options.prompt_chunks or 1)
        return ShapeRange(corner, corner, corner)
    opt = options.opt_size or (native, native)
    lo = options.min_size or tuple(min(d, o) for d, o in zip(DEFAULT_MIN, opt))
    hi = options.max_size or tuple(max(d, o) for d, o in zip(DEFAULT_MAX, opt))
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
        raise InvalidRequest(f"--min {lo[0]}x{lo[1]} --opt {opt[0]}x{opt[1]} --max {hi[0]}x{hi[1]}: each side "
                             "has to grow from --min to --opt to --max")
    chunks = options.prompt_chunks or DEFAULT_CHUNKS
    return ShapeRange(Corner(1, *lo, 1), Corner(1, *opt, 1), Corner(options.max_batch or DEFAULT_MAX_BATCH, *hi,
                                                                     chunks))


def dims(spec_name: str, arch: dict, corner: Corner, cfg: bool = True) -> dict[str, int]:
    """The spec symbols of the graph ``spec_name`` in a request at ``corner``: its batch as the pipeline runs it
    (:func:`builds.rows`: the UNet and ControlNets on [uncond; cond] with ``cfg``), and the UNet and ControlNets
    take prompts of ``chunks`` 77-token chunks, the text encoder one chunk at a time."""
    return builds.symbols(spec_name, arch, corner.batch, corner.width, corner.height,
                          builds.tokens(spec_name, corner.chunks), cfg)


def profile(spec: ComponentSpec, arch: dict, shapes: ShapeRange, cfg: bool = True) -> dict[str, tuple]:
    """(min, opt, max) of every input of ``spec``. The lowest corner of a dynamic range runs without guidance
    (batch n, guidance_scale 1); a static build assumes guidance, as OpenVINO's static builds do, unless ``cfg``
    is False (``--no-cfg``: every corner runs one UNet row per image)."""
    return spec.profile(dims(spec.name, arch, shapes.lo, cfg and shapes.static),
                        dims(spec.name, arch, shapes.opt, cfg), dims(spec.name, arch, shapes.hi, cfg))


def graphs(manifest: mf.Manifest) -> dict[str, tuple[mf.Component, ComponentSpec]]:
    """Every graph of the export an engine is built for, with its spec (fp16 graphs get the fp16 spec)."""
    arch = manifest.architecture
    found = dict(manifest.components)
    found |= {f"{name}_tiling": c for name, c in manifest.tiling.items()}
    if manifest.unet_control is not None:
        found["unet_control"] = manifest.unet_control
    found |= {f"controlnet/{name}": c for name, c in manifest.controlnets.items()}
    found = {name: (c, spec_for(c, arch)) for name, c in found.items()}
    return {name: (c, half(spec) if c.precision == "fp16" else spec) for name, (c, spec) in found.items()}


def engine_file(component: str) -> str:
    return component.replace("/", "__") + ".engine"


def precision(manifest: mf.Manifest, requested: str | None) -> str:
    """fp32 and fp16 exports build at their own precision or lower (an fp32 export builds fp16 kernels with
    ``--precision fp16``); int8 starts from an fp32 export (QDQ graphs of :mod:`sdrt.quantize`)."""
    own = sorted({c.precision for c in manifest.components.values()})
    if requested is None or [requested] == own or (own == ["fp32"] and requested in ("fp16", "int8")):
        return requested or own[0]
    raise InvalidRequest(f"--precision {requested}: this export is {'/'.join(own)}; TensorRT builds an fp16 "
                         "export at fp16, an fp32 one at fp32, fp16 or int8; re-export without --fp16 for that")


def settings(manifest: mf.Manifest, options: builds.BuildOptions, gpu: Gpu) -> dict:
    """Everything besides the sources and the TensorRT version that makes an engine differ (the cache key)."""
    arch = manifest.architecture
    shapes = shape_range(options, arch.get("sample_size", 64) * arch.get("vae_factor", 8))
    prec = precision(manifest, options.precision)
    profiles = {name: {k: [list(s) for s in v] for k, v in profile(spec, arch, shapes, options.cfg).items()}
                for name, (_, spec) in graphs(manifest).items()}
    found = {"scheme": SCHEME, "precision": prec, "static": shapes.static, "profiles": profiles,
             "refit": sorted(n for n in profiles if n in REFITTABLE and not (prec == "int8" and n == "unet")),
             "gpu": {"name": gpu.name, "compute_capability": list(gpu.compute_capability)},
             "optimization_level": OPTIMIZATION_LEVEL}
    if not options.cfg:             # recorded only when set, so the builds made before the option keep their key
        found["cfg"] = False
    return found


def sources(manifest: mf.Manifest) -> dict[str, str]:
    """sha256 of every graph an engine is built from (and of its external data)."""
    return {rel: manifest.files[rel] for c, _ in graphs(manifest).values()
            for rel in (c.file, c.file + "_data") if rel in manifest.files}


def key(manifest: mf.Manifest, settings_: dict, version: str) -> str:
    return builds.entry_key(sources(manifest), settings_, f"tensorrt {version}")


def timing_cache_path(folder: Path, gpu: Gpu, version: str) -> Path:
    """TensorRT's timing cache, shared by every build of this export on this GPU model and TensorRT version."""
    cc = "".join(map(str, gpu.compute_capability))
    return folder / CACHE / f"timing-sm{cc}-trt{version}.cache"


def save_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:            # read-only cache: the next build measures again
        log.warning("cannot save the TensorRT timing cache %s (%s)", path, e.strerror)
        tmp.unlink(missing_ok=True)


# -- TensorRT (needs the tensorrt package and a CUDA GPU; not executed here) --------------------------------

def build_engine(trt, logger, onnx: Path, shapes: dict[str, tuple], prec: str, refit: bool, strongly_typed: bool,
                 timing_cache: bytes) -> tuple[bytes, bytes]:
    """Parse ``onnx`` and build a serialized engine with one optimization profile ``shapes``; returns the plan
    and the updated timing cache.

    ``strongly_typed`` (an fp16 export) keeps the graph's own types, so the fp32 islands sdrt's fp16 export keeps
    (softmax, GroupNorm, the timestep embedding) stay fp32; an fp32 export built at fp16 lets TensorRT pick
    fp16 kernels (``BuilderFlag.FP16``); int8 graphs carry QDQ nodes (explicit quantization) and build with
    ``INT8`` and ``FP16`` so the layers between them run fp16. (TensorRT 10.12 deprecates the FP16/INT8 flags in
    favour of strongly typed networks; they still build.)
    """
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):       # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT {trt.__version__} cannot parse {onnx.name}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = OPTIMIZATION_LEVEL
    if not strongly_typed and prec in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if not strongly_typed and prec == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        opt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendUnavailable(f"TensorRT {trt.__version__} could not build {onnx.name} (see the log above); "
                                 "try a smaller --max or --max-batch, or --precision fp32")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build(folder: str | Path, options: builds.BuildOptions, progress: bool = True) -> Path:
    """Build an engine per graph of the export into ``folder/cache/tensorrt/<key>/`` (reused when already built
    for this GPU model and TensorRT version); returns the entry folder. ``--precision int8`` first quantizes the
    UNet to symmetric int8 QDQ (:func:`sdrt.quantize.onnxruntime.quantize_build`, calibrated on sdrt's fp32
    pipeline on ONNX Runtime's CPU provider) and builds its engine from that graph."""
    from . import tensorrt as backend
    trt = backend.trt_module()
    folder = Path(folder)
    manifest = mf.read(folder)
    options.check(manifest.architecture.get("vae_factor", 8))
    gpu = backend.gpu(backend.device_index(options.device))
    backend.check(backend.cudart().cudaSetDevice(gpu.index))       # TensorRT builds on the current device
    version = trt.__version__
    config = settings(manifest, options, gpu)
    if config["precision"] == "int8":
        from ..quantize import onnxruntime as quantize
        config["int8"] = quantize.settings(manifest, options, symmetric=True)
    entry = folder / CACHE / key(manifest, config, version)
    if builds.find(folder, entry) is not None:
        builds.touch(entry)
        return entry
    timing = timing_cache_path(folder, gpu, version)
    cache = timing.read_bytes() if timing.is_file() else b""
    logger = backend.logger()
    with builds.staging(entry.parent, entry.name) as tmp:
        record = {"backend": "tensorrt", "version": version, "options": config, "sources": sources(manifest),
                  "components": {}}
        found = graphs(manifest)
        if config["precision"] == "int8":
            record["int8"] = _quantize(folder, manifest, tmp, options, progress)
        for name, (comp, spec) in _bar(found.items(), "tensorrt: building engines", progress):
            int8 = name == "unet" and "int8" in record          # the other engines of an int8 build are fp16
            prec = "int8" if int8 else ("fp16" if config["precision"] == "int8" else config["precision"])
            shapes = {k: tuple(map(tuple, v)) for k, v in config["profiles"][name].items()}
            plan, cache = build_engine(trt, logger, tmp / "unet.onnx" if int8 else folder / comp.file, shapes, prec,
                                       name in config["refit"], comp.precision == "fp16", cache)
            (tmp / engine_file(name)).write_bytes(plan)
            record["components"][name] = {"spec": comp.spec, "file": engine_file(name), "source": comp.file,
                                          "precision": prec}
        for path in tmp.iterdir():              # the QDQ graph (and its external data) lives on in the engine
            if path.suffix != ".engine":
                path.unlink()
        save_atomically(timing, cache)
        builds.commit(tmp, entry, record)
    return entry


def _quantize(folder: Path, manifest: mf.Manifest, tmp: Path, options, progress: bool) -> dict:
    """The symmetric int8 QDQ UNet (TensorRT takes int8 activations with zero point 0 only) in ``tmp``, and its
    quality against fp32 as ONNX Runtime's CPU provider computes it (TensorRT's kernels are not measured)."""
    from ..quantize import onnxruntime as quantize
    _, quality = quantize.quantize_build(folder, manifest, tmp, options, progress, symmetric=True)
    return {"quality": quality, "measured_with": "onnxruntime CPU (the QDQ graph, not the TensorRT engine)"}


def _bar(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    items = list(items)
    return tqdm(items, desc=desc, unit="engine", disable=None if enabled else True, leave=False)
