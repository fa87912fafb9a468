"""`sdrt` command line: argparse -> options -> one library call. User errors exit 2 with one line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from .errors import InvalidRequest, SdrtError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args) or 0
    except SdrtError as e:
        print(f"sdrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdrt {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdrt", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a diffusers folder, hub id or .safetensors/.ckpt file to ONNX")
    e.add_argument("model", help="diffusers folder, hub id, or single-file .safetensors/.ckpt checkpoint")
    e.add_argument("out", type=Path, help="folder to write (must not exist or be empty, unless --overwrite)")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--fp16", action="store_true", help="export float16 graphs")
    e.add_argument("--config", help="local diffusers folder giving the configs of a single-file checkpoint")
    e.add_argument("--no-parity", action="store_true", help="skip the ONNX-vs-torch check after export")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT")
    e.set_defaults(run=_export)

    b = sub.add_parser("build", help="compile an export for a backend (OpenVINO IR), cached in OUT/cache/")
    b.add_argument("model", type=Path, help="an exported folder")
    b.add_argument("--backend", required=True, help="openvino (onnxruntime runs the ONNX files as they are)")
    b.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="default: the export's own")
    b.add_argument("--static", type=_size, metavar="WIDTHxHEIGHT",
                   help="fix every input shape for this image size (default: dynamic shapes)")
    b.add_argument("--batch", type=int, help="images per request of a --static build (default 1)")
    b.add_argument("--device", default="CPU", help="OpenVINO device to compile for: CPU, GPU, NPU")
    q = b.add_argument_group("int8 (--precision int8: NNCF, calibrated by running the fp32 pipeline)")
    q.add_argument("--calibration-prompts", type=Path, metavar="FILE",
                   help="prompts to calibrate on, one per line (default: sdrt's own set of 32)")
    q.add_argument("--calibration-size", type=int, metavar="N", help="how many prompts (default 32)")
    q.add_argument("--calibration-steps", type=int, metavar="N", help="sampler steps per prompt (default 10)")
    q.add_argument("--calibration-resolution", type=_size, metavar="WIDTHxHEIGHT",
                   help="image size to calibrate at (default: --static, else the model's native size)")
    q.add_argument("--min-cosine", type=float, default=0.95, help="warn below this latent cosine vs fp32")
    q.add_argument("--min-psnr", type=float, default=20.0, help="warn below this image PSNR (dB) vs fp32")
    b.set_defaults(run=_build)

    g = sub.add_parser("generate", help="txt2img, img2img (--init-image) or inpainting (--init-image --mask)")
    g.add_argument("model", type=Path, help="an exported folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (CFG)")
    g.add_argument("--sampler", default="Euler a", help='A1111 name, e.g. "Euler a", "DPM++ 2M Karras"')
    g.add_argument("--scheduler", help="A1111 schedule type, e.g. karras (default: the sampler's own)")
    g.add_argument("--seed", type=int, default=-1, help="-1 draws a random seed; image i uses seed+i")
    g.add_argument("--rng", default="cpu", choices=["cpu", "nv", "numpy"],
                   help="noise source: cpu = torch CPU generator, nv = torch CUDA (A1111 'NV')")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--init-image", type=Path, help="PNG/JPEG for img2img or inpainting")
    g.add_argument("--strength", type=float, help="denoising strength (img2img 0.75, inpaint 1.0)")
    g.add_argument("--mask", type=Path, help="inpainting mask, white = repaint (same size as --init-image)")
    g.add_argument("--latents", type=Path, help=".npy initial noise of shape (B, 4, H/8, W/8)")
    g.add_argument("--runtime", default="auto")
    g.add_argument("--precision", choices=["fp32", "fp16", "int8"])
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--device", help="OpenVINO device: CPU, GPU, NPU (default CPU)")
    g.add_argument("--output", type=Path, required=True, help="PNG path; batch image i > 0 gets a -i suffix")
    g.set_defaults(run=_generate)

    d = sub.add_parser("demo", help="offline: build a tiny random-weight model, export, generate, time it")
    d.add_argument("--out", type=Path, help="keep the demo's files here (default: a temp folder)")
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--size", type=int, default=128)
    d.set_defaults(run=_demo)

    from .benchmark import add_parser as add_bench      # numpy-only module; peers load in subprocesses
    add_bench(sub)
    return p


def _export(args) -> int:
    from .exporters import ExportOptions, export
    options = ExportOptions(opset=args.opset, fp16=args.fp16, check_parity=not args.no_parity,
                            overwrite=args.overwrite, config=args.config)
    manifest = export(args.model, args.out, options)
    print(f"exported {args.model} -> {args.out} ({', '.join(manifest.components)})")
    return 0


def _size(text: str) -> tuple[int, int]:
    """argparse type for WIDTHxHEIGHT."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x512, not {text!r}") from None
    return width, height


def _build(args) -> int:
    from .runtimes import BuildOptions, build
    options = BuildOptions(backend=args.backend, precision=args.precision, static=args.static, batch=args.batch,
                           device=args.device, calibration_prompts=args.calibration_prompts,
                           calibration_size=args.calibration_size, calibration_steps=args.calibration_steps,
                           calibration_resolution=args.calibration_resolution, min_cosine=args.min_cosine,
                           min_psnr=args.min_psnr)
    entry = build(args.model, options)      # an int8 build below the thresholds logs a WARNING line
    print(f"built {args.model} for {args.backend} -> {entry}")
    record = json.loads((entry / "build.json").read_text())
    if "quality" in record:
        from .quantize.openvino import describe
        print(describe(record["quality"]))
    return 0


def _generate(args) -> int:
    import numpy as np

    from . import load
    from .pipelines.images import open_image
    if args.mask and not args.init_image:
        raise InvalidRequest("--mask needs --init-image (the picture to inpaint)")
    device = {"device": args.device} if args.device else {}
    pipe = load(args.model, runtime=args.runtime, precision=args.precision, threads=args.threads, **device)
    kw = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance,
              sampler=args.sampler, scheduler=args.scheduler, seed=args.seed, batch_size=args.batch_size,
              rng=args.rng)
    kw |= {k: v for k, v in (("width", args.width), ("height", args.height)) if v is not None}
    if args.latents:
        kw["latents"] = np.load(args.latents)
    if args.init_image:
        image = open_image(args.init_image)
        if args.mask:
            result = pipe.inpaint(image, open_image(args.mask), args.prompt, strength=_or(args.strength, 1.0), **kw)
        else:
            result = pipe.img2img(image, args.prompt, strength=_or(args.strength, 0.75), **kw)
    else:
        result = pipe.txt2img(args.prompt, **kw)
    for i, path in enumerate(_outputs(args.output, len(result))):
        result.save(path, i)
        print(f"{path}  seed {result.seeds[i]}")
    return 0


def _or(value, default):
    return default if value is None else value


def _outputs(path: Path, n: int) -> list[Path]:
    path = path if path.suffix else path.with_suffix(".png")
    return [path] + [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n)]


def _demo(args) -> int:
    """Build a tiny random-weight SD model, export it, build it for the runtime, run txt2img and img2img, time it."""
    from . import load, runtimes
    from .exporters import ExportOptions, export
    from .exporters.random_model import build_random_model
    backend = runtimes.pick("auto")
    name = backend.__name__.rsplit(".", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="sdrt-demo-") as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        source = build_random_model(root / "diffusers-tiny", arch="tiny")
        t1 = time.perf_counter()
        export(str(source), root / "export", ExportOptions(overwrite=True))
        t2 = time.perf_counter()
        if hasattr(backend, "build"):                   # OpenVINO: ONNX -> IR, compiled into its model cache
            runtimes.build(root / "export", runtimes.BuildOptions(backend=name))
        t3 = time.perf_counter()
        pipe = load(root / "export", runtime=name)
        t4 = time.perf_counter()
        result = pipe.txt2img("a photograph of an astronaut riding a horse", width=args.size,
                              height=args.size, steps=args.steps, seed=1, sampler="DPM++ 2M Karras")
        again = pipe.img2img(result[0], "a watercolor painting", strength=0.6, steps=args.steps, seed=2)
        png = Path(args.out or ".") / "sdrt-demo.png"
        result.save(png)
        print(f"sdrt demo: tiny random-weight SD model, {args.size}x{args.size}, {args.steps} steps, "
              f"DPM++ 2M Karras, CFG 7.5, {name} CPU")
        print(f"  build random model  {t1 - t0:7.2f} s\n  export + parity     {t2 - t1:7.2f} s\n"
              f"  {'build ' + name:<20}{t3 - t2:7.2f} s\n  load                {t4 - t3:7.2f} s")
        for label, r in (("txt2img", result), ("img2img", again)):
            parts = "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in r.timings.items() if k != "total")
            print(f"  {label:<18}  {r.timings['total']:7.2f} s   ({parts})")
        print(f"  image: {png}  ({result.infotexts[0].splitlines()[-1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
