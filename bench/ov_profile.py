"""Where one SD 1.x UNet evaluation spends its time in OpenVINO: per op type and per kernel (the kernel name
says its precision, e.g. ``brgconv_avx512_I8`` against ``brgemm_avx512_f32``).

    python bench/ov_profile.py UNET.xml [UNET2.xml ...] [--size 512] [--threads 2]

Any UNet IR or ONNX file with SD 1.x inputs (``sample``, ``timestep``, ``encoder_hidden_states``): sdrt's
builds and Optimum-Intel's ``unet/openvino_model.xml`` alike. Batch 2 (CFG for one image), f32 inference
precision, OpenVINO's ``PERF_COUNT`` over the second of two inferences. ``--size`` reshapes dynamic
models only: a static build runs at the size it was built for.
"""
from __future__ import annotations

import argparse
import collections

import numpy as np
import openvino as ov


def profile(path: str, size: int, threads: int) -> tuple[collections.Counter, collections.Counter]:
    core = ov.Core()
    model = core.read_model(path)
    shapes = [[2, 4, size // 8, size // 8], [2], [2, 77, 768]]      # in the graph's input order
    if any(p.get_partial_shape().is_dynamic for p in model.inputs):
        model.reshape({p: s for p, s in zip(model.inputs, shapes)})
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32",
                                                 "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    feeds = {}
    for port in compiled.inputs:
        shape, dtype = list(port.get_shape()), port.get_element_type().to_dtype()
        feeds[port] = np.full(shape, 500, dtype) if len(shape) == 1 else rng.standard_normal(shape).astype(dtype)
    request.infer(feeds)
    request.infer(feeds)
    by_type, by_kernel = collections.Counter(), collections.Counter()
    for info in request.profiling_info:
        by_type[info.node_type] += info.real_time.total_seconds()
        by_kernel[info.exec_type] += info.real_time.total_seconds()
    return by_type, by_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for path in args.models:
        by_type, by_kernel = profile(path, args.size, args.threads)
        total = sum(by_type.values())
        print(f"{path}: {total:.2f} s")
        for title, counts in (("op type", by_type), ("kernel", by_kernel)):
            print(f"  by {title}:")
            for name, seconds in counts.most_common(8):
                print(f"    {name:32s} {seconds:6.2f} s {100 * seconds / total:5.1f} %")


if __name__ == "__main__":
    main()
