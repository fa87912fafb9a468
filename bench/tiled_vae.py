"""Peak memory and time of one VAE decode at a large size, whole vs tiled, each in its own process.

    python bench/tiled_vae.py OUT --size 2048 [--runtime onnxruntime] [--json FILE]

OUT is an sdrt export. Latents are random (memory and time do not depend on their values). Peak memory is
the process's maximum resident set size (``ru_maxrss``); the size right after loading is reported too, so
the decode's share can be read off.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(folder: str, size: int, runtime: str, tiled_vae: bool) -> dict:
    import numpy as np

    import sdrt
    from sdrt.pipelines.tiling import tiled

    pipe = sdrt.load(folder, runtime=runtime, progress=False)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    z = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)

    def run(x):
        return pipe.models.vae_decoder.run({"latent_sample": x})["sample"]
    began = time.perf_counter()
    out = tiled(run, z, 8) if tiled_vae else run(z)
    seconds = time.perf_counter() - began
    assert out.shape == (1, 3, size, size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"tiled": tiled_vae, "size": size, "seconds": round(seconds, 2), "peak_rss_gb": round(peak, 3),
            "rss_after_load_gb": round(loaded, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--json")
    p.add_argument("--child", choices=["whole", "tiled"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.folder, args.size, args.runtime, args.child == "tiled")))
        return
    rows = []
    for mode in ("tiled", "whole"):
        cmd = [sys.executable, __file__, args.folder, "--size", str(args.size), "--runtime", args.runtime,
               "--child", mode]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            why = (done.stderr.strip().splitlines() or [f"killed by signal {-done.returncode}"
                                                         if done.returncode < 0 else f"exit {done.returncode}"])[-1]
            rows.append({"tiled": mode == "tiled", "size": args.size, "error": why})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
