"""One UNet step (batch 2: CFG for one image) for each build of an export, and the ONNX file itself.

    python bench/unet_step.py OUT [--runtime openvino|onnxruntime] [--sizes 512 256] [--runs 3] [--threads 2]

Median of ``--runs`` after one warm-up, same random inputs for every build.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from sdrt.runtimes import onnxruntime as ort_backend
from sdrt.runtimes import openvino as ov_backend
from sdrt.specs import UNET

GRAPH = {"openvino": "unet.xml", "onnxruntime": "unet.onnx"}


def builds(folder: Path, runtime: str) -> dict[str, Path]:
    """label -> UNet graph: the exported ONNX and every build of ``runtime`` in the cache."""
    found = {"onnx fp32 (dynamic)": folder / "unet.onnx"}
    for entry in sorted((folder / "cache" / runtime).glob("*/build.json")):
        options = json.loads(entry.read_text())["options"]
        found[f"build {options['precision']} ({entry.parent.name})"] = entry.parent / GRAPH[runtime]
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtime", choices=sorted(GRAPH), default="openvino")
    args = p.parse_args()
    backend = ov_backend if args.runtime == "openvino" else ort_backend
    dim = json.loads((args.model / "sdrt.json").read_text())["architecture"]["cross_attention_dim"]
    rng = np.random.default_rng(0)
    for size in args.sizes:
        feeds = {"sample": rng.standard_normal((2, 4, size // 8, size // 8), dtype=np.float32),
                 "timestep": np.array([500.0, 500.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, dim), dtype=np.float32)}
        for label, path in builds(args.model, args.runtime).items():
            unet = backend.load(path, UNET, threads=args.threads)
            unet.run(feeds)
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                unet.run(feeds)
                times.append(time.perf_counter() - start)
            print(f"{size}x{size} batch 2  {args.runtime} {label:<32} median {statistics.median(times):6.2f} s  "
                  f"runs {[round(t, 2) for t in times]}", flush=True)
            del unet


if __name__ == "__main__":
    main()
