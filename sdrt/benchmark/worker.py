"""One measured system in its own process: ``python -m sdrt.benchmark.worker SPEC_JSON`` prints one JSON object.

Run by :func:`sdrt.benchmark.run`, one process per system, so that peak RSS and load time belong to that
system alone and a crashing peer cannot take the run down. Anything the measured libraries print goes to
stderr; stdout carries only the result.

A spec names either an sdrt runtime (``{"kind": "sdrt", "runtime": "onnxruntime", "precision": "fp32", ...}``)
or a peer (``{"kind": "peer", "peer": "diffusers", ...}``, measured by :mod:`sdrt.benchmark.peers`), plus the
shared settings (folder, width, height, steps, guidance, batch, runs, warmup, threads, seed, prompt, sampler,
scheduler, vae).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from importlib import metadata
from typing import Callable

import numpy as np


def timed(fn: Callable[[], object], runs: int, warmup: int) -> dict:
    """Call ``fn`` ``warmup`` times, then ``runs`` times; seconds of each call and the median of the runs."""
    warm = []
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "runs_s": times, "warmup_s": warm}


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of the named distributions (absent ones left out); no package is imported."""
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def measure_sdrt(spec: dict) -> dict:
    """Load an export on one sdrt runtime, time each component called directly, then txt2img end to end.

    OpenVINO runs at the spec's ``inference_precision`` when given; the precision it compiled the UNet to,
    read back, is the result's ``precision``.
    """
    import sdrt

    asked = spec.get("inference_precision")
    options = {"inference_precision": asked} if asked and spec["runtime"] == "openvino" else {}
    began = time.perf_counter()
    pipe = sdrt.load(spec["folder"], runtime=spec["runtime"], precision=spec["precision"],
                     threads=spec["threads"], progress=False, **options)
    load_s = time.perf_counter() - began
    feeds = component_feeds(pipe.models, spec)
    calls = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet_step": "unet",
             "vae_decoder": "vae_decoder", "vae_encoder": "vae_encoder", "vae_decoder_tiny": "vae_decoder_tiny"}
    components = {}
    for label, attr in calls.items():
        runtime = getattr(pipe.models, attr)
        if runtime is not None and attr in feeds:
            components[label] = {**timed(lambda: runtime.run(feeds[attr]), spec["runs"], spec["warmup"]),
                                 "batch": len(next(iter(feeds[attr].values())))}
    results = []

    def generate():
        results.append(pipe.txt2img(spec["prompt"], width=spec["width"], height=spec["height"],
                                    steps=spec["steps"], guidance_scale=spec["guidance"],
                                    sampler=spec["sampler"], scheduler=spec.get("scheduler"),
                                    vae=spec.get("vae", "full"), seed=spec["seed"], batch_size=spec["batch"]))
    e2e = timed(generate, spec["runs"], spec["warmup"])
    measured = results[spec["warmup"]:]
    if spec.get("image_out"):
        measured[-1].images[0].save(spec["image_out"])
    e2e["inside_s"] = {k: statistics.median(r.timings[k] for r in measured) for k in measured[0].timings
                       if k != "total"}
    computes = getattr(pipe.models.unet.inner, "inference_precision", None)
    return {"load_s": load_s, "components": components, "e2e": e2e,
            "versions": versions("sdrt", "numpy", "onnxruntime", "openvino"),
            **({"precision": computes} if computes else {})}


def component_feeds(models, spec: dict) -> dict[str, dict[str, np.ndarray]]:
    """Inputs of the shapes the pipeline feeds for one request: each text encoder one 77-token chunk, the
    UNet at batch 2 with guidance > 1 ([uncond; cond]; batch 1 at guidance <= 1 and for an LCM UNet, whose
    guidance is an embedding), with SDXL's pooled text embeddings and size time ids, the VAEs (full and tiny)
    one image at a time."""
    rng = np.random.default_rng(0)
    arch = models.arch
    guided = spec["guidance"] > 1.0 and not arch.get("time_cond_proj_dim")     # an LCM UNet: no CFG batch
    dims = dict(B=(2 if guided else 1) * spec["batch"], H=spec["height"], W=spec["width"],
                C=arch["latent_channels"], CI=arch.get("unet_in_channels", arch["latent_channels"]),
                D=arch["cross_attention_dim"], S=arch.get("model_max_length", 77),
                TC=arch.get("time_cond_proj_dim") or 1, P=arch.get("text_embeds_dim", 1), T=arch.get("time_ids", 6))
    feeds = {"unet": models.unet.spec.sample(rng, **dims),
             "vae_decoder": models.vae_decoder.spec.sample(rng, **{**dims, "B": 1})}
    feeds["unet"]["timestep"] = np.full(dims["B"], 500.0, dtype=np.float32)
    for attr, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if getattr(models, attr, None) is not None:
            feeds[attr] = {"input_ids": getattr(models, tokenizer)([spec["prompt"]])}
    for attr in ("vae_encoder", "vae_decoder_tiny"):
        runtime = getattr(models, attr, None)
        if runtime is not None:
            feeds[attr] = runtime.spec.sample(rng, **{**dims, "B": 1})
    return feeds


def measure(spec: dict) -> dict:
    """Dispatch on the spec's kind; the result always carries status, peak RSS and the process's facts."""
    try:
        if spec["kind"] == "sdrt":
            result = measure_sdrt(spec)
        else:
            from . import peers
            result = peers.measure(spec)
        result.setdefault("status", "ok")
    except Exception as e:                          # reported, not raised: the other systems still run
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(e).__name__}: {_first_line(e)}"}
    # Linux reports ru_maxrss in KiB
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["torch_imported"] = "torch" in sys.modules          # sdrt's own runs must stay torch-free
    result["python"] = sys.executable
    result["python_version"] = platform.python_version()
    return result


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    out = os.dup(1)
    os.dup2(2, 1)                                   # libraries' prints (C level too) go to stderr
    result = measure(spec)
    sys.stdout.flush()
    os.write(out, (json.dumps(result) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
