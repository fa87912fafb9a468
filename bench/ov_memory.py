"""Compile one SDXL UNet IR on the CPU, call it twice, and report time and memory: anonymous RSS (what the plugin
allocated: repacked weights, buffers) apart from file-backed RSS (the weights file OpenVINO maps).

    python bench/ov_memory.py OUT/cache/openvino/KEY/unet.xml bf16              # sdrt's build
    python bench/ov_memory.py OPTIMUM_DIR/unet/openvino_model.xml bf16          # Optimum-Intel's IR

Inputs are random, at CFG's batch 2 and --latent (64: 512x512); dynamic axes take those sizes. Linux only.
"""
from __future__ import annotations

import argparse
import re
import resource
import time

import numpy as np
import openvino as ov


def memory() -> str:
    status = open("/proc/self/status").read()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    kinds = {k: int(v) / 2**20 for k, v in re.findall(r"Rss(Anon|File):\s+(\d+) kB", status)}
    return f"peak RSS {peak:.2f} GiB, anonymous {kinds['Anon']:.2f} GiB, file-backed {kinds['File']:.2f} GiB"


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("model")
    a.add_argument("precision", choices=("f32", "bf16", "f16"))
    a.add_argument("--latent", type=int, default=64)
    args = a.parse_args()
    core = ov.Core()
    weights = {}
    for op in core.read_model(args.model).get_ops():
        if op.get_type_name() == "Constant":
            kind = op.get_element_type().get_type_name()
            weights[kind] = weights.get(kind, 0) + op.get_byte_size()
    print("constants, GB by type:", {k: round(v / 1e9, 2) for k, v in weights.items()})
    began = time.perf_counter()
    compiled = core.compile_model(args.model, "CPU", {"INFERENCE_PRECISION_HINT": args.precision,
                                                      "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2})
    print(f"compile {time.perf_counter() - began:.1f} s; {memory()}")
    n = args.latent
    known = {"sample": (2, 4, n, n), "encoder_hidden_states": (2, 77, 2048), "text_embeds": (2, 1280),
             "time_ids": (2, 6)}
    rng = np.random.default_rng(0)
    feeds = {}
    for port in compiled.inputs:
        shape = next((s for name, s in known.items() if name in port.get_names()), None)
        shape = shape or tuple(d.get_length() if d.is_static else 2 for d in port.get_partial_shape())  # timestep
        feeds[port.get_any_name()] = rng.random(shape).astype(port.get_element_type().to_dtype())
    request = compiled.create_infer_request()
    for call in range(2):
        began = time.perf_counter()
        request.infer(feeds)
        print(f"call {call}: {time.perf_counter() - began:.1f} s; {memory()}")


if __name__ == "__main__":
    main()
