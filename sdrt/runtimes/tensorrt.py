"""TensorRT backend: engines built by :mod:`.trt_build`, run through cuda-python, without torch.

    sdrt build OUT --backend tensorrt --precision fp16        # engines in OUT/cache/tensorrt/<key>/
    sdrt.load("OUT", runtime="tensorrt")                      # the newest build for this GPU and TensorRT

NOT EXECUTED on this project's machines (no GPU; TensorRT cannot be installed there). The code follows the
documented TensorRT 10 Python API (``Runtime.deserialize_cuda_engine``, ``IExecutionContext.set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3``, ``Refitter``) and cuda-python's ``cuda.bindings.runtime``
(``cudaMalloc``, ``cudaMemcpyAsync``, streams, ``cudaStreamBeginCapture`` CUDA graphs). What runs anywhere
(the profile check, its error message, device parsing) is tested on CPU; the execution tests are marked gpu.

One :class:`TrtRuntime` per engine: its input and output buffers are allocated once, on the device, at the
profile's largest shapes, and reused for every call; inputs are copied host->device and outputs device->host at
each ``run`` (the ``Runtime`` protocol takes and returns NumPy arrays). A static engine (one shape) replays a CUDA
graph of its ``execute_async_v3`` after the first call. Keeping latents on the device across sampler steps
would need the pipeline to hold device arrays between UNet calls (a ``run`` taking and returning device
buffers, and the sampler's arithmetic on the GPU, e.g. with CuPy): a pipeline change, not done here.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import manifest as mf
from ..errors import BackendUnavailable, InvalidRequest, ModelFolderError, ProfileError
from ..specs import ComponentSpec
from ..weights import onnx_file
from . import builds, trt_build
from .base import check_feeds
from .trt_build import CACHE, Gpu, build  # noqa: F401  (build: `sdrt build --backend tensorrt`)

log = logging.getLogger(__name__)

RUNS_BUILDS_ONLY = True     # no engine for an export: runtime="auto" goes on to the next runtime


def trt_module():
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable("tensorrt is not installed; `pip install sdrt[tensorrt]` on a machine with an "
                                 "NVIDIA GPU and driver") from None
    return tensorrt


def cudart():
    try:
        from cuda.bindings import runtime            # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime       # older cuda-python
        except ImportError:
            raise BackendUnavailable("cuda-python is not installed; `pip install sdrt[tensorrt]`") from None
    return runtime


def check(result):
    """The value of a cuda-python call ``(err, value...)``; a CUDA error becomes BackendUnavailable."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendUnavailable(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) or None)


@functools.cache
def unusable() -> str | None:
    """Why TensorRT cannot run here (not installed, no CUDA device), or None when it can."""
    try:
        trt_module()
        if check(cudart().cudaGetDeviceCount()) < 1:
            return "no CUDA device"
    except BackendUnavailable as e:
        return str(e)
    return None


def available() -> bool:
    return unusable() is None


@functools.cache
def logger():
    trt = trt_module()
    return trt.Logger(trt.Logger.WARNING)


def device_index(device: str | None) -> int:
    """The CUDA device of ``--device``: GPU / cuda (0), GPU.N / cuda:N; CPU (the CLI's default) means 0."""
    text = (device or "GPU").strip()
    for prefix, sep in (("GPU", "."), ("cuda", ":")):
        if text.lower() == prefix.lower() or text.upper() == "CPU":
            return 0
        if text.lower().startswith((prefix + sep).lower()) and text[len(prefix) + 1:].isdigit():
            return int(text[len(prefix) + 1:])
    raise InvalidRequest(f"--device {device!r}: TensorRT runs on a CUDA device: GPU, GPU.1, cuda:1, ...")


def gpu(index: int) -> Gpu:
    props = check(cudart().cudaGetDeviceProperties(index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return Gpu(index, name.rstrip("\x00"), (props.major, props.minor))


# -- the profile check (pure) ----------------------------------------------------------------------------

def check_profile(spec: ComponentSpec, shapes: Mapping[str, tuple], profile: Mapping[str, tuple],
                  folder: Path | None = None) -> None:
    """ProfileError when an input shape lies outside the engine's (min, max) for it."""
    for name, shape in shapes.items():
        lo, _, hi = profile[name]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            raise ProfileError(misfit(spec, name, shapes, profile, folder))


def misfit(spec: ComponentSpec, name: str, shapes: Mapping[str, tuple], profile: Mapping[str, tuple],
           folder: Path | None) -> str:
    """The error of a request (input ``shapes``) whose ``name`` lies outside the engine's ``profile``: the
    profile in tensor shapes and image sizes, and the ``sdrt build`` flags that make an engine for it."""
    lo, _, hi = (tuple(s) for s in profile[name])
    static = all(p[0] == p[2] for p in profile.values())
    sized = next((t for t in spec.inputs if _size(t.shape, t.resolve(_ONES)) and t.name in shapes), None)
    built = [_size(sized.shape, profile[sized.name][i]) for i in (0, 2)] if sized else [None, None]
    asked = _size(sized.shape, shapes[sized.name]) if sized else None
    chunks = ""
    tokens = shapes.get("encoder_hidden_states")
    if tokens is not None and len(tokens) == 3 and tokens[1] > profile["encoder_hidden_states"][2][1]:
        chunks = f" --prompt-chunks {-(-tokens[1] // 77)}"
    command = f"sdrt build {folder or 'OUT'} --backend tensorrt"
    if static:
        rebuild = builds.static_rebuild(command, spec.name, max(_rows(spec, shapes), 1), asked, chunks)
    else:
        batch, most = max(_batch(spec, shapes), 1), _batch(spec, {n: p[2] for n, p in profile.items()})
        flags = f"--max {_grown(built[1], asked)} --max-batch {max(batch, most)}"
        if asked and built[0] and _shrunk(built[0], asked) != built[0]:
            flags = f"--min {_shrunk(built[0], asked)} " + flags     # smaller than the smallest size built
        rebuild = f"`{command} {flags}{chunks}`"
    where = f" ({built[0]}{'' if static else f'..{built[1]}'})" if built[0] else ""
    return (f"{spec.name}: '{name}' has shape {tuple(shapes[name])}, outside this TensorRT engine's profile "
            f"{lo if static else f'min {lo} .. max {hi}'}{where}; rebuild with {rebuild}")


_ONES = {k: 8 for k in ("B", "H", "W", "S", "D", "C", "CI", "L")}


def _size(symbols: tuple, shape: tuple) -> str | None:
    """'WIDTHxHEIGHT' in pixels from a shape whose symbols hold the image size ("H", "W/8", ...)."""
    px = {s[0]: n * (int(s.split("/")[1]) if "/" in s else 1)
          for s, n in zip(symbols, shape) if isinstance(s, str) and s[0] in "HW"}
    return f"{px['W']}x{px['H']}" if len(px) == 2 else None


def _rows(spec: ComponentSpec, shapes: Mapping[str, tuple]) -> int:
    """The inputs' batch axis."""
    return next((shapes[t.name][0] for t in spec.inputs if t.shape[:1] == ("B",) and t.name in shapes), 1)


def _batch(spec: ComponentSpec, shapes: Mapping[str, tuple]) -> int:
    """Images per request behind the inputs' batch axis (the UNet and ControlNets see 2 rows per image)."""
    return -(-_rows(spec, shapes) // 2) if spec.name in builds.GUIDED else _rows(spec, shapes)


def _shrunk(built: str, asked: str) -> str:
    (bw, bh), (aw, ah) = (map(int, s.split("x")) for s in (built, asked))
    return f"{min(bw, aw)}x{min(bh, ah)}"


def _grown(built: str | None, asked: str | None) -> str:
    if not built or not asked:
        return asked or "WIDTHxHEIGHT"
    (bw, bh), (aw, ah) = (map(int, s.split("x")) for s in (built, asked))
    return f"{max(bw, aw)}x{max(bh, ah)}"


# -- the runtime (needs TensorRT and a GPU; not executed here) ----------------------------------------------

class TrtRuntime:
    """A component served by a TensorRT engine on one CUDA stream.

    Args:
        plan: the serialized engine.
        spec: the component's spec.
        source: the ONNX graph the engine was built from (the weights ``refit`` restores).
        device: CUDA device index.
        cuda_graph: replay a CUDA graph of the engine's launch when its shapes are fixed.
        folder: the export, for error messages.
    """

    def __init__(self, plan: bytes, spec: ComponentSpec, source: Path | None = None, device: int = 0,
                 cuda_graph: bool = True, folder: Path | None = None):
        trt, rt = trt_module(), cudart()
        check(rt.cudaSetDevice(device))
        self.spec, self.source, self.folder, self.device = spec, source, folder, device
        self.engine = trt.Runtime(logger()).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendUnavailable(f"{spec.name}: TensorRT {trt.__version__} cannot load this engine (built by "
                                     "another TensorRT version or for another GPU); `sdrt build` it again")
        self.context = self.engine.create_execution_context()
        self.stream = check(rt.cudaStreamCreate())
        self._handle = int(self.stream)         # TensorRT takes the stream as an integer handle
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [t.name for t in spec.outputs if t.name in names]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.profile = {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)) for n in self.inputs}
        self.static = all(lo == hi for lo, _, hi in self.profile.values())
        self.cuda_graph = cuda_graph and self.static
        self._graph = None              # the instantiated CUDA graph of a static engine
        self._shapes: dict[str, tuple] = {}
        self._refitted: set[str] = set()
        self.buffers = self._allocate(names)

    def _allocate(self, names: list[str]) -> dict[str, tuple[int, int]]:
        """Device buffers (pointer, bytes) for every tensor at the profile's largest shapes, made once."""
        rt = cudart()
        for name, (_, _, hi) in self.profile.items():
            self.context.set_input_shape(name, hi)
        buffers = {}
        for name in names:
            shape = self.profile[name][2] if name in self.profile else tuple(self.context.get_tensor_shape(name))
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize
            buffers[name] = (check(rt.cudaMalloc(max(nbytes, 1))), nbytes)
            self.context.set_tensor_address(name, buffers[name][0])
        return buffers

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        host = {n: np.ascontiguousarray(v, dtype=self.dtypes[n]) for n, v in feeds.items()}
        check_profile(self.spec, {n: v.shape for n, v in host.items()}, self.profile, self.folder)
        rt = cudart()
        shapes = {n: v.shape for n, v in host.items()}
        if shapes != self._shapes:
            for name, shape in shapes.items():
                self.context.set_input_shape(name, shape)
            self._shapes = shapes
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, value in host.items():
            check(rt.cudaMemcpyAsync(self.buffers[name][0], value.ctypes.data, value.nbytes, h2d, self.stream))
        self._launch()
        out = {n: np.empty(tuple(self.context.get_tensor_shape(n)), self.dtypes[n]) for n in self.outputs}
        for name, value in out.items():
            check(rt.cudaMemcpyAsync(value.ctypes.data, self.buffers[name][0], value.nbytes, d2h, self.stream))
        check(rt.cudaStreamSynchronize(self.stream))
        return out

    def _launch(self) -> None:
        """One inference on the stream; a static engine captures it as a CUDA graph on the first call (after an
        ordinary launch, which lets TensorRT finish its lazy set-up) and replays the graph afterwards."""
        rt = cudart()
        if self._graph is not None:
            check(rt.cudaGraphLaunch(self._graph, self.stream))
            return
        if not self.context.execute_async_v3(self._handle):
            raise BackendUnavailable(f"{self.spec.name}: TensorRT inference failed (see the log)")
        if self.cuda_graph:
            check(rt.cudaStreamSynchronize(self.stream))
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            check(rt.cudaStreamBeginCapture(self.stream, mode))
            self.context.execute_async_v3(self._handle)
            graph = check(rt.cudaStreamEndCapture(self.stream))
            self._graph = check(rt.cudaGraphInstantiate(graph, 0))
            check(rt.cudaGraphDestroy(graph))

    def refit(self, values: Mapping[str, np.ndarray] | None) -> None:
        """Replace weights in place (LoRAs, weight overrides) with ``trt.Refitter``: ``values`` by ONNX
        initializer name; weights set before and absent now go back to the source graph's; None restores all.
        The engine must be built refittable (``sdrt build`` does so for the text encoder and the UNet)."""
        trt = trt_module()
        values = dict(values or {})
        if not self.engine.refittable:
            raise InvalidRequest(f"{self.spec.name}: this TensorRT engine is not refittable (int8, or a VAE), "
                                 "so LoRAs and weight overrides cannot apply to it")
        refitter = trt.Refitter(self.engine, logger())
        known = set(refitter.get_all_weights())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelFolderError(f"{self.spec.name}: the engine has no refittable weights {unknown[:3]} "
                                   f"({len(unknown)} missing); rebuild it with `sdrt build --backend tensorrt`")
        kept = []                       # TensorRT reads the host arrays until refit_cuda_engine returns
        for name in sorted(set(values) | self._refitted):
            kept.append(self._set_weights(trt, refitter, name, values.get(name)))
        for name in refitter.get_missing_weights():     # weights TensorRT fused with the ones set
            kept.append(self._set_weights(trt, refitter, name, values.get(name)))
        if not refitter.refit_cuda_engine():
            raise BackendUnavailable(f"{self.spec.name}: TensorRT refused the new weights (see the log)")
        self._refitted = set(values)
        if self._graph is not None:     # recapture: the graph may hold pointers to the old weights
            check(cudart().cudaGraphExecDestroy(self._graph))
            self._graph = None

    def _set_weights(self, trt, refitter, name: str, value: np.ndarray | None) -> np.ndarray:
        prototype = refitter.get_weights_prototype(name)
        value = self._original(name) if value is None else value
        value = np.ascontiguousarray(value, dtype=trt.nptype(prototype.dtype))
        if value.size != prototype.size:
            raise InvalidRequest(f"{self.spec.name}: '{name}' has {value.size} values, the engine's weight "
                                 f"{prototype.size}; a shape change (e.g. embeddings adding tokens to the text "
                                 "encoder) needs another engine: load with runtime='onnxruntime' for that")
        if not refitter.set_named_weights(name, trt.Weights(value)):
            raise BackendUnavailable(f"{self.spec.name}: TensorRT rejected the weights '{name}'")
        return value

    def _original(self, name: str) -> np.ndarray:
        if self.source is None:
            raise ModelFolderError(f"{self.spec.name}: the engine's source graph is unknown; rebuild it")
        return initializer(self.source, name)

    def __del__(self):
        try:
            rt = cudart()
            for pointer, _ in getattr(self, "buffers", {}).values():
                rt.cudaFree(pointer)
            if getattr(self, "_graph", None) is not None:
                rt.cudaGraphExecDestroy(self._graph)
            if getattr(self, "stream", None) is not None:
                rt.cudaStreamDestroy(self.stream)
        except Exception:               # interpreter shutdown: CUDA may already be gone
            pass


def initializer(path: Path, name: str) -> np.ndarray:
    """The value of ONNX initializer ``name`` of the graph ``path`` (or its external data), read without onnx."""
    t = onnx_file.read_index(path).initializers.get(name)
    if t is None or t.dtype is None:
        raise ModelFolderError(f"{path.name} has no weight {name!r}; re-export the model")
    count = int(np.prod(t.shape, dtype=np.int64))
    return np.fromfile(path.parent / t.file, dtype=t.dtype, count=count, offset=t.offset).reshape(t.shape)


@functools.lru_cache(maxsize=4)
def _plan(path: Path, mtime_ns: int) -> bytes:
    """The bytes of an engine that takes new weights, kept so that the next LoRA change deserializes it without
    reading the disk again (first loads read the file and keep nothing)."""
    return path.read_bytes()


def load(path: Path, spec: ComponentSpec, threads: int = 0, initializers: Mapping[str, np.ndarray] | None = None,
         device: str | None = None, cuda_graph: bool = True) -> TrtRuntime:
    """A runtime for the engine ``path`` (or for the engine built from the ONNX graph ``path``, as the
    ControlNets and unet_control are named); ``initializers`` (ONNX name -> value) are refitted into it.
    ``threads`` is accepted for the common signature and ignored.

    The weights reload path (LoRAs, overrides: :class:`sdrt.weights.overrides.WeightOverrides`) calls this with
    the merged initializers: the engine is deserialized again and refitted, never rebuilt; until the old
    runtime is dropped both engines hold device memory.
    """
    path = Path(path)
    folder = next((p for p in path.resolve().parents if (p / mf.MANIFEST).is_file()), None)
    index = device_index(device)
    engine, source = (path, _source(folder, path)) if path.suffix == ".engine" else _engine_of(folder, path, index)
    plan = _plan(engine, engine.stat().st_mtime_ns) if initializers else engine.read_bytes()
    runtime = TrtRuntime(plan, spec, source, index, cuda_graph, folder)
    if initializers:
        runtime.refit(initializers)
    return runtime


def _source(folder: Path | None, engine: Path) -> Path | None:
    """The ONNX graph an engine of a build was made from (its record names it)."""
    if folder is None:
        return None
    record = builds.find(folder, engine.parent)
    comp = next((c for c in (record or {}).get("components", {}).values() if c["file"] == engine.name), None)
    return folder / comp["source"] if comp else None


def _engine_of(folder: Path | None, onnx: Path, device: int = 0) -> tuple[Path, Path]:
    """The newest intact engine built from ``onnx`` for this GPU and TensorRT version."""
    if folder is not None:
        rel = str(onnx.resolve().relative_to(folder.resolve()))
        found = _newest(folder, mf.read(folder, verify=False), None, lambda r: any(
            c["source"] == rel for c in r["components"].values()), device)
        if found is not None:
            entry, record = found
            comp = next(c for c in record["components"].values() if c["source"] == rel)
            return entry / comp["file"], folder / rel
    raise ModelFolderError(f"{onnx} has no TensorRT engine for this GPU and TensorRT version; "
                           f"`sdrt build {folder or 'OUT'} --backend tensorrt` first")


def _newest(folder: Path, manifest: mf.Manifest, precision: str | None, match=lambda r: True, device: int = 0):
    version, sources = trt_module().__version__, trt_build.sources(manifest)
    here = gpu(device)
    return builds.newest(folder, folder / CACHE, lambda r: r.get("version") == version
                         and r.get("sources") == sources and r["options"]["gpu"]["name"] == here.name
                         and tuple(r["options"]["gpu"]["compute_capability"]) == here.compute_capability
                         and precision in (None, r["options"]["precision"]) and match(r))


def artifacts(folder: Path, manifest: mf.Manifest, precision: str | None = None) -> dict[str, mf.Component]:
    """The engines of the newest intact build of this export for this GPU model and TensorRT version, at
    ``precision`` (None: the export's own, else any). TensorRT runs engines only: without a build, an error
    that says to build."""
    own = min(c.precision for c in manifest.components.values())
    found = (_newest(folder, manifest, precision) if precision else
             (_newest(folder, manifest, own) or _newest(folder, manifest, None)))
    if found is None:
        asked = f" --precision {precision}" if precision else ""
        raise ModelFolderError(f"{folder} has no TensorRT{asked} build for this GPU ({gpu(0).name}) and TensorRT "
                               f"{trt_module().__version__}; `sdrt build {folder} --backend tensorrt{asked}`")
    entry, record = found
    log.info("tensorrt: running the build %s (%s)", entry.name, record["options"]["precision"])
    rel = entry.relative_to(folder)
    return {name: mf.Component(spec=c["spec"], file=str(rel / c["file"]), precision=c["precision"])
            for name, c in record["components"].items() if name in manifest.components}
