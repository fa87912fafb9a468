"""Time few-step settings against a 20-step CFG baseline on one export with a tiny autoencoder.

    python bench/fewstep.py [--work /tmp/fewstep-bench] [--size 256] [--runs 5] [--runtime onnxruntime]

Builds (once, in --work) the tiny random-weight model with a random tiny autoencoder and exports it with
``--tiny-vae``; then reports the median end-to-end time of each setting and the UNet and decoder seconds of
that run. Weights are random (latency does not depend on them); compare rows of one run, not across runs.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

CASES = {"Euler a, 20 steps, CFG 7.5, VAE": dict(sampler="Euler a", steps=20, guidance_scale=7.5),
         "LCM, 4 steps, CFG 1.5, VAE": dict(sampler="LCM", steps=4, guidance_scale=1.5),
         "LCM, 4 steps, CFG 1.5, TAESD": dict(sampler="LCM", steps=4, guidance_scale=1.5, vae="tiny"),
         "Euler a, SGM Uniform, 1 step, CFG 0, TAESD": dict(sampler="Euler a", scheduler="sgm_uniform", steps=1,
                                                            guidance_scale=0.0, vae="tiny")}


def export_once(work: Path) -> Path:
    from sdrt.exporters import ExportOptions, export
    from sdrt.exporters.random_model import build_random_model, build_random_tiny_vae
    out = work / "out"
    if not out.is_dir():
        model = build_random_model(work / "model", "tiny", seed=0)
        export(str(model), out, ExportOptions(tiny_vae=str(build_random_tiny_vae(work / "taesd", seed=4))),
               progress=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fewstep-bench"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runtime", default="onnxruntime")
    args = parser.parse_args()

    import sdrt
    pipe = sdrt.load(export_once(args.work), runtime=args.runtime, progress=False)
    print("| setting | e2e ms | UNet ms | decoder ms |\n|---|---|---|---|")
    for name, kw in CASES.items():
        pipe.txt2img("a red fox", width=args.size, height=args.size, seed=1, **kw)          # warm-up
        runs = [pipe.txt2img("a red fox", width=args.size, height=args.size, seed=1, **kw).timings
                for _ in range(args.runs)]
        median = statistics.median(t["total"] for t in runs)
        t = min(runs, key=lambda t: abs(t["total"] - median))
        decoder = t.get("vae_decoder", 0.0) + t.get("vae_decoder_tiny", 0.0)
        print(f"| {name} | {median * 1e3:.0f} | {t['unet'] * 1e3:.0f} | {decoder * 1e3:.0f} |")


if __name__ == "__main__":
    main()
