"""The peers sdrt is compared with, measured inside a worker process (:mod:`sdrt.benchmark.worker`).

This is the one module outside ``sdrt/exporters`` allowed to import torch, diffusers and optimum, and only
the worker subprocess imports it: nothing in the package's run path does, so a runtime-only install stays
torch-free. Every peer here is a diffusers ``StableDiffusionPipeline`` or, for an SDXL export (the spec's
``family``), ``StableDiffusionXLPipeline`` (Optimum's pipelines subclass them and put their compiled parts
where the torch modules were), so one harness times them all:

- ``diffusers``: the torch fp32 pipeline, ``torch.set_num_threads(threads)``.
- ``optimum-intel``: ``OVStableDiffusion(XL)Pipeline`` on OpenVINO CPU, dynamic shapes.
- ``optimum-intel-static``: the same IR statically reshaped with ``.reshape(batch, height, width, 1)`` (the
  UNet at batch 1 when guidance <= 1: optimum-intel's reshape assumes CFG's two rows).
- ``optimum-intel-int8``, ``optimum-intel-int8-static``: the IR with optimum-intel's hybrid quantization
  (``OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=PROMPTS, num_samples=N)``: int8
  weights everywhere, the UNet's activations too, calibrated by its own loop over the prompt list, no
  dataset download), dynamic and static.
- ``optimum-onnxruntime``: Optimum's ``ORTStableDiffusion(XL)Pipeline`` on the CPU execution provider.

The Optimum peers convert the diffusers folder once (``export``, in its own process, so its memory does
not count against the peer) into ``cache_dir`` and load from there, as sdrt loads its own export. Optimum-Intel
stores the weights at the export's precision (``weight_format``: fp16 for an ``sdrt export --fp16``, as
``optimum-cli export openvino --weight-format fp16``), so both load the same bytes.
All use the diffusers scheduler the spec names (``scheduler_class``, resolved from sdrt's sampler and
schedule names by the harness), the spec's size, steps, guidance and seed with a CPU ``torch.Generator``.
With ``tiny_vae_source`` (``--vae tiny``) they decode with that AutoencoderTiny: diffusers in torch,
Optimum-Intel with its decoder converted to OpenVINO at the same settings as the pipeline.

Per component: the text encoders, UNet and VAE decoder are timed by wrapping the pipeline's parts during the
end-to-end runs (the text encoder is called twice per image with CFG, prompt and negative prompt); the VAE
encoder, which txt2img does not use, by calling the full VAE's ``encode`` directly.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from .worker import timed, versions

# peer family -> (modules it imports, how to install them)
REQUIRES = {"diffusers": (("torch", "diffusers"), "pip install -c constraints.txt torch diffusers transformers"),
            "optimum-intel": (("optimum.intel",), 'pip install -c constraints.txt "optimum-intel[openvino]"'),
            "optimum-onnxruntime": (("optimum.onnxruntime",),
                                    'pip install -c constraints.txt "optimum-onnx[onnxruntime]"')}
SCHEDULERS = {"Euler a": "EulerAncestralDiscreteScheduler", "Euler": "EulerDiscreteScheduler",
              "DDIM": "DDIMScheduler", "DPM++ 2M": "DPMSolverMultistepScheduler", "LMS": "LMSDiscreteScheduler"}
# (diffusers, Optimum-Intel, Optimum ONNX Runtime) pipeline class names per model family
# (the export's ``family``; the SDXL refiner is img2img only, not a txt2img peer)
_SD = ("StableDiffusionPipeline", "OVStableDiffusionPipeline", "ORTStableDiffusionPipeline")
PIPELINES = {"sd1": _SD, "sd2": _SD, "sdxl": ("StableDiffusionXLPipeline", "OVStableDiffusionXLPipeline",
                                               "ORTStableDiffusionXLPipeline")}
VERSIONS = ("torch", "diffusers", "transformers", "optimum", "optimum-intel", "optimum-onnx", "openvino",
            "onnxruntime")


def family(peer: str) -> str:
    """The package family of a peer: ``optimum-intel-static`` and ``optimum-intel-int8`` run optimum-intel."""
    return "optimum-intel" if peer.startswith("optimum-intel") else peer


def conversion(peer: str) -> str:
    """The cached conversion a peer loads: the static peers share their dynamic peer's."""
    return peer.removesuffix("-static")


def missing(peer: str) -> str | None:
    """How to install the peer's package when it is not importable here, else None."""
    modules, install = REQUIRES[family(peer)]
    for module in modules:
        try:
            __import__(module)
        except ImportError as e:
            return f"no module {e.name or module}; `{install}`"
    return None


def measure(spec: dict) -> dict:
    """Export (``mode == "export"``) or load and time one peer; ``not installed`` when its package is absent."""
    peer = spec["peer"]
    why = missing(peer)
    if why is not None:
        return {"status": "not installed", "error": why}
    if spec.get("mode") == "export":
        return export(spec)
    import torch
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec.get("tiny_vae_source") and family(peer) == "optimum-onnxruntime":
        return {"status": "skipped", "error": "--vae tiny is not wired for the Optimum ONNX Runtime peer"}
    cls = pipeline_class(peer, spec.get("family", "sd1"))    # imported before the clock starts, as sdrt is
    began = time.perf_counter()
    pipe = load(cls, spec)
    full_vae = pipe.vae
    if spec.get("tiny_vae_source"):
        tiny = tiny_vae(spec)
        pipe.vae = tiny if peer == "diffusers" else TinyVae(tiny, full_vae)
    load_s = time.perf_counter() - began
    scheduler = use_sampler(pipe, spec)
    decoder = "vae_decoder_tiny" if spec.get("tiny_vae_source") else "vae_decoder"
    with torch.inference_mode():
        e2e, inside = end_to_end(pipe, spec, decoder)
        encode = vae_encode(full_vae, spec)
    components = {"text_encoder": _per_run(inside, "text_encoder", 1),
                  "unet_step": _per_run(inside, "unet", spec["steps"]),
                  decoder: _per_run(inside, decoder, spec["batch"])}
    if getattr(pipe, "text_encoder_2", None) is not None:
        components["text_encoder_2"] = _per_run(inside, "text_encoder_2", 1)
    if encode is not None:
        components["vae_encoder"] = encode
    e2e["inside_s"] = {k: statistics.median(r.get(k, 0.0) for r in inside) for k in inside[0]}
    return {"load_s": load_s, "components": components, "e2e": e2e, "scheduler": scheduler,
            "precision": precision(pipe), "versions": versions(*VERSIONS)}


def pipeline_class(peer: str, model_family: str = "sd1"):
    """The peer's pipeline class for an export of ``model_family`` (``sd1``, ``sd2``, ``sdxl``)."""
    names = PIPELINES.get(model_family)
    if names is None:
        raise ValueError(f"no txt2img peer pipeline for the model family {model_family!r}; "
                         f"peers run {', '.join(PIPELINES)}")
    if peer == "diffusers":
        import diffusers
        return getattr(diffusers, names[0])
    if family(peer) == "optimum-intel":
        import optimum.intel
        return getattr(optimum.intel, names[1])
    import optimum.onnxruntime
    return getattr(optimum.onnxruntime, names[2])


def load(cls, spec: dict):
    """The peer's pipeline, ready to run (compiled, for OpenVINO)."""
    peer, threads = spec["peer"], spec["threads"]
    if peer == "diffusers":
        import torch
        pipe = cls.from_pretrained(spec["source"], torch_dtype=torch.float32, safety_checker=None,
                                   requires_safety_checker=False)
    elif family(peer) == "optimum-intel":
        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        if spec.get("inference_precision"):
            config["INFERENCE_PRECISION_HINT"] = spec["inference_precision"]
        pipe = cls.from_pretrained(spec["model_dir"], compile=False, ov_config=config)
        if peer.endswith("-static"):
            pipe.reshape(batch_size=spec["batch"], height=spec["height"], width=spec["width"],
                         num_images_per_prompt=1)
            if spec["guidance"] <= 1.0:
                unbatch_unet(pipe, spec["batch"])
        pipe.compile()
    else:
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        pipe = cls.from_pretrained(spec["model_dir"], provider="CPUExecutionProvider", session_options=options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def precision(pipe) -> str:
    """The precision the peer computes in: OpenVINO's CPU plugin picks bf16 by itself on CPUs with
    AVX512-BF16 or AMX unless told otherwise, so it is read back from the compiled UNet."""
    request = getattr(pipe.unet, "request", None)
    if request is not None and hasattr(request, "get_property"):          # an OpenVINO CompiledModel
        value = request.get_property("INFERENCE_PRECISION_HINT")             # an openvino Type
        return value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return str(getattr(pipe.unet, "dtype", "float32")).replace("torch.", "")


def unbatch_unet(pipe, batch: int) -> None:
    """After optimum-intel's static ``reshape`` (which gives the UNet CFG's 2 x batch rows unless it takes
    ``timestep_cond``): the UNet at ``batch`` rows, as diffusers runs it with guidance <= 1."""
    model = pipe.unet.model
    shapes = {}
    for tensor in model.inputs:
        shape = tensor.get_partial_shape()
        if tensor.get_any_name() != "timestep" and shape.rank.get_length() >= 1:
            shape[0] = batch
        shapes[tensor] = shape
    model.reshape(shapes)


def tiny_vae(spec: dict):
    """The AutoencoderTiny of ``tiny_vae_source`` in torch fp32; for Optimum-Intel its decoder converted to
    OpenVINO and compiled as the pipeline's parts are (threads, inference precision)."""
    import torch
    from diffusers import AutoencoderTiny
    vae = AutoencoderTiny.from_pretrained(spec["tiny_vae_source"], torch_dtype=torch.float32).eval()
    if family(spec["peer"]) == "optimum-intel":
        import openvino
        OpenVINOModule = _openvino_module()     # a torch class, made once torch is imported
        latents = torch.zeros(1, vae.config.latent_channels, spec["height"] // 8, spec["width"] // 8)
        model = openvino.convert_model(vae.decoder, example_input=latents)
        config = {"INFERENCE_NUM_THREADS": spec["threads"]} if spec["threads"] else {}
        if spec.get("inference_precision"):
            config["INFERENCE_PRECISION_HINT"] = spec["inference_precision"]
        vae.decoder = OpenVINOModule(openvino.Core().compile_model(model, "CPU", config))
    return vae


class TinyVae:
    """The tiny autoencoder in an Optimum-Intel pipeline's ``vae`` slot: ``decode`` and ``config`` (scaling
    factor 1) are the AutoencoderTiny's; everything else is the pipeline's own VAE host, whose decoder IR
    the pipeline reads its static height and width from."""

    def __init__(self, tiny, host):
        self.tiny, self.host = tiny, host

    @property
    def config(self):
        return self.tiny.config

    def decode(self, *args, **kwargs):
        return self.tiny.decode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.host, name)


def _openvino_module():
    import torch

    class OpenVINOModule(torch.nn.Module):
        """A compiled OpenVINO model standing in for a torch module of one tensor in, one out."""

        def __init__(self, compiled):
            super().__init__()
            self.compiled = compiled

        def forward(self, x):
            return torch.from_numpy(self.compiled(x.numpy())[0].copy())
    return OpenVINOModule


def use_sampler(pipe, spec: dict) -> str:
    """Switch to the diffusers scheduler the harness resolved from sdrt's sampler and schedule names
    (``scheduler_class``: [class name, config overrides]); returns the class name used."""
    name, overrides = spec.get("scheduler_class") or (SCHEDULERS.get(spec["sampler"]), {})
    if name is not None:
        import diffusers
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    return type(pipe.scheduler).__name__


def end_to_end(pipe, spec: dict, decoder: str = "vae_decoder") -> tuple[dict, list[dict]]:
    """txt2img timed as a whole; the seconds inside each part, per measured run."""
    import torch
    clock: dict[str, float] = defaultdict(float)
    _watch(pipe.text_encoder, "forward", "text_encoder", clock)
    if getattr(pipe, "text_encoder_2", None) is not None:
        _watch(pipe.text_encoder_2, "forward", "text_encoder_2", clock)
    _watch(pipe.unet, "forward", "unet", clock)
    _watch(pipe.vae, "decode", decoder, clock)
    inside = []

    def generate():
        clock.clear()
        out = pipe(spec["prompt"], negative_prompt=None, height=spec["height"], width=spec["width"],
                   num_inference_steps=spec["steps"], guidance_scale=spec["guidance"],
                   num_images_per_prompt=spec["batch"], generator=torch.Generator("cpu").manual_seed(spec["seed"]))
        inside.append(dict(clock))
        if spec.get("image_out"):
            out.images[0].save(spec["image_out"])
    e2e = timed(generate, spec["runs"], spec["warmup"])
    return e2e, inside[spec["warmup"]:]


def vae_encode(vae, spec: dict) -> dict | None:
    """One image through ``vae.encode``, warm-up then median; None when the peer has no VAE encoder."""
    import torch
    if getattr(vae, "encoder", None) is None:
        return None
    x = torch.randn((1, 3, spec["height"], spec["width"]), generator=torch.Generator("cpu").manual_seed(0))
    return {**timed(lambda: vae.encode(x), spec["runs"], spec["warmup"]), "batch": 1}


def _watch(obj, attr: str, label: str, clock: dict) -> None:
    """Replace ``obj.attr`` (on the instance) by a wrapper adding its wall time to ``clock[label]``."""
    inner = getattr(obj, attr)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            clock[label] += time.perf_counter() - start
    setattr(obj, attr, wrapper)


def _per_run(inside: list[dict], key: str, per: int) -> dict:
    """A part's seconds per run divided by ``per`` (steps for the UNet), as a median over the runs."""
    times = [r.get(key, 0.0) / per for r in inside]
    return {"median_s": statistics.median(times), "runs_s": times, "warmup_s": [], "in_pipeline": True}


def export(spec: dict) -> dict:
    """Convert the diffusers folder for an Optimum peer into ``cache_dir`` once; reuse it afterwards. The hybrid
    int8 conversion calibrates on the spec's ``calibration_prompts`` (``int8_samples`` UNet calls)."""
    fam, name = family(spec["peer"]), conversion(spec["peer"])
    package = {"optimum-intel": "optimum-intel", "optimum-onnxruntime": "optimum-onnx"}[fam]
    source = Path(spec["source"]).resolve()
    stamp = f"{source}:{(source / 'model_index.json').stat().st_mtime_ns}"
    int8 = name.endswith("-int8")
    if int8:
        stamp += f":{spec['int8_samples']}:" + "\n".join(spec["calibration_prompts"])
        name += f"-n{spec['int8_samples']}"
    elif fam == "optimum-intel" and spec.get("weight_format", "fp32") != "fp32":
        name += f"-{spec['weight_format']}"
    key = f"{name}-{metadata.version(package)}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
    target = Path(spec["cache_dir"]) / key
    if (target / "model_index.json").is_file():
        return {"model_dir": str(target), "export_s": None, "versions": versions(*VERSIONS)}
    target.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{key}-") as tmp:
        cls = pipeline_class(spec["peer"], spec.get("family", "sd1"))
        staged = Path(tmp) / uuid.uuid4().hex
        if int8:
            from optimum.intel import OVWeightQuantizationConfig
            config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=spec["calibration_prompts"],
                                                num_samples=spec["int8_samples"])
            cls.from_pretrained(str(source), export=True, compile=False, quantization_config=config).save_pretrained(
                staged)
        elif fam == "optimum-intel":
            # as `optimum-cli export openvino --weight-format F`, F the export's precision, no int8 weights
            # (from_pretrained(export=True, load_in_8bit=False) left SDXL's UNet unsaved, optimum-intel 2.2)
            from optimum.exporters.openvino import main_export
            from optimum.intel import OVConfig
            main_export(str(source), staged, task="text-to-image",
                        ov_config=OVConfig(dtype=spec.get("weight_format", "fp32")))
        else:
            cls.from_pretrained(str(legacy_tokenizer(source, Path(tmp))), export=True).save_pretrained(staged)
        try:
            staged.rename(target)               # atomic: a killed export leaves no half-written target
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
            shutil.rmtree(staged, ignore_errors=True)
    return {"model_dir": str(target), "export_s": time.perf_counter() - began, "versions": versions(*VERSIONS)}


def legacy_tokenizer(source: Path, work: Path) -> Path:
    """``source`` as transformers < 5 can read it (optimum-onnx pins transformers 4.x).

    transformers 4 loads ``CLIPTokenizer`` from ``vocab.json`` + ``merges.txt``; a folder saved by
    transformers 5 keeps only ``tokenizer.json``. Returns a view of the folder in ``work``: the model
    folders symlinked (the same weights, not copies) and a tokenizer folder with both files written from
    ``tokenizer.json``. Folders that already have ``vocab.json`` are returned as they are.
    """
    import transformers
    tokenizer = source / "tokenizer"
    if int(transformers.__version__.split(".")[0]) >= 5 or (tokenizer / "vocab.json").is_file() \
            or not (tokenizer / "tokenizer.json").is_file():
        return source
    view = work / "source"
    view.mkdir()
    for child in source.iterdir():
        if child.name != "tokenizer":
            (view / child.name).symlink_to(child.resolve())
    shutil.copytree(tokenizer, view / "tokenizer")
    bpe = json.loads((tokenizer / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (view / "tokenizer" / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    (view / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return view
