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
    e.add_argument("--config", help="single-file checkpoints: a local diffusers folder of the same architecture "
                                    "whose configs are used (default: those of the detected family, offline)")
    e.add_argument("--no-parity", action="store_true", help="skip the ONNX-vs-torch check after export")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT")
    e.add_argument("--controlnet", action="append", default=[], metavar="[NAME=]MODEL",
                   help="also export this ControlNet (folder, hub id or single file) as NAME (repeatable; "
                        "NAME defaults to MODEL's last path component)")
    e.add_argument("--tiling", action="store_true",
                   help="also export circular-padded UNet and VAE graphs for seamless tiling (generate --tiling)")
    e.add_argument("--tiny-vae", metavar="PATH",
                   help="also export this tiny autoencoder (TAESD; an AutoencoderTiny folder or hub id such as "
                        "madebyollin/taesd, madebyollin/taesdxl for SDXL) for fast decoding (generate --vae tiny) "
                        "and live previews")
    e.set_defaults(run=_export)

    b = sub.add_parser("build", help="compile an export for a backend (OpenVINO IR, TensorRT engines, ONNX Runtime "
                                     "int8 or GPU graphs), cached in OUT/cache/")
    b.add_argument("model", type=Path, help="an exported folder")
    b.add_argument("--backend", required=True,
                   help="openvino (IR at any --precision), tensorrt (engines for this GPU), or onnxruntime "
                        "(--precision int8 for the CPU, or --device GPU: fused graphs for the CUDA provider)")
    b.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                   help="default: the export's own; fp16: fp16 weights (OpenVINO); int8: quantized UNet")
    b.add_argument("--static", type=_size, metavar="WIDTHxHEIGHT",
                   help="fix every input shape for this image size (default: dynamic shapes)")
    b.add_argument("--batch", type=int, help="images per request of a --static build (default 1)")
    b.add_argument("--no-cfg", dest="cfg", action="store_false",
                   help="the UNet sees one row per image, not [uncond; cond]: for models run at guidance_scale <= 1 "
                        "(SD-Turbo, SDXL-Turbo); a --static build or a TensorRT profile otherwise holds 2 per image")
    b.add_argument("--device", default="CPU", help="OpenVINO device to compile for: CPU, GPU, NPU; TensorRT: the "
                   "CUDA device (GPU, GPU.1); ONNX Runtime: GPU for fused CUDA graphs")
    r = b.add_argument_group("TensorRT shape range of a dynamic build (a request outside it is refused with the "
                             "flags to rebuild with)")
    r.add_argument("--min", type=_size, dest="min_size", metavar="WIDTHxHEIGHT",
                   help="smallest image (default 256x256)")
    r.add_argument("--opt", type=_size, dest="opt_size", metavar="WIDTHxHEIGHT",
                   help="the size kernels are tuned for (default: the model's native size)")
    r.add_argument("--max", type=_size, dest="max_size", metavar="WIDTHxHEIGHT",
                   help="largest image (default 1024x1024)")
    r.add_argument("--max-batch", type=int, help="images per request, up to (default 4; the UNet sees 2 per image)")
    r.add_argument("--prompt-chunks", type=int,
                   help="77-token prompt chunks the UNet takes, up to (default 3 dynamic, 1 with --static); "
                        "OpenVINO: with --static only (dynamic builds take any length)")
    q = b.add_argument_group("int8 (--precision int8: NNCF for OpenVINO, static QDQ for ONNX Runtime, calibrated "
                             "by running the fp32 pipeline)")
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
    g.add_argument("--scheduler", help="A1111 schedule type: karras, sgm_uniform (trailing timesteps, for "
                                       "SD-Turbo) (default: the sampler's own)")
    g.add_argument("--seed", type=int, default=-1, help="-1 draws a random seed; image i uses seed+i")
    g.add_argument("--rng", default="cpu", choices=["cpu", "nv", "numpy"],
                   help="noise source: cpu = torch CPU generator, nv = torch CUDA (A1111 'NV')")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--clip-skip", type=int, default=1, help="A1111's Clip skip: 2 uses CLIP's penultimate layer")
    g.add_argument("--emphasis", default="Original", choices=["Original", "No norm", "Ignore", "None"],
                   help="how (word:1.2) weights apply (A1111's option)")
    g.add_argument("--tiled-vae", action="store_true", help="VAE in overlapping tiles: bounded memory at large sizes")
    g.add_argument("--tiling", action="store_true", help="seamless tiling: opposite edges join (export with --tiling)")
    g.add_argument("--vae", default="full", choices=["full", "tiny"],
                   help="tiny: decode (and encode) with the tiny autoencoder (export with --tiny-vae)")
    x = g.add_argument_group("SDXL size and aesthetic conditioning (default: the image's size, crop 0,0; the "
                             "negative prompt's default to the positive's)")
    x.add_argument("--original-size", type=_size, metavar="WIDTHxHEIGHT", help="the size the model is told the "
                   "training image had (smaller: a blurrier, upscaled look)")
    x.add_argument("--crop-top-left", type=_point, metavar="X,Y", help="the crop's top-left corner the model is told "
                   "of, in pixels from the left (X) and the top (Y)")
    x.add_argument("--target-size", type=_size, metavar="WIDTHxHEIGHT", help="the intended output size (base only)")
    x.add_argument("--negative-original-size", type=_size, metavar="WIDTHxHEIGHT")
    x.add_argument("--negative-crop-top-left", type=_point, metavar="X,Y")
    x.add_argument("--negative-target-size", type=_size, metavar="WIDTHxHEIGHT")
    x.add_argument("--aesthetic-score", type=float, help="refiner only: the aesthetic score to aim at (default 6)")
    x.add_argument("--negative-aesthetic-score", type=float, help="refiner only: the negative prompt's (default 2.5)")
    h = g.add_argument_group("hires fix (txt2img: generate, upscale, img2img at the larger size)")
    h.add_argument("--hires-scale", type=float, help="enable it, with this upscale factor (e.g. 2)")
    h.add_argument("--hires-upscaler", default="Latent", help='A1111 name: "Latent", "Latent (nearest)", '
                   '"Latent (nearest-exact)", "Lanczos", "Nearest", "None"')
    h.add_argument("--hires-steps", type=int, default=0, help="second-pass steps (0: as --steps)")
    h.add_argument("--hires-strength", type=float, default=0.7, help="second-pass denoising strength")
    g.add_argument("--outpaint", type=_sides, metavar="LEFT,RIGHT,TOP,BOTTOM",
                   help="with --init-image: extend the canvas by these pixels and inpaint the new area")
    g.add_argument("--init-image", type=Path, help="PNG/JPEG for img2img or inpainting")
    g.add_argument("--strength", type=float, help="denoising strength (img2img 0.75, inpaint 1.0)")
    g.add_argument("--mask", type=Path, help="inpainting mask, white = repaint (same size as --init-image)")
    g.add_argument("--resize-mode", default="0", metavar="MODE",
                   help="fit --init-image to --width/--height as A1111: 0 just resize, 1 crop and resize, "
                        "2 resize and fill, 3 just resize (latent upscale; img2img only)")
    i = g.add_argument_group("inpainting (with --mask; A1111's options)")
    i.add_argument("--mask-blur", type=int, default=0, metavar="PX", help="Gaussian blur of the mask (default 0)")
    i.add_argument("--inpainting-fill", default="original",
                   choices=["fill", "original", "latent noise", "latent nothing"],
                   help="what the masked area starts from (default original)")
    i.add_argument("--invert-mask", action="store_true", help="repaint where the mask is black")
    i.add_argument("--only-masked", action="store_true",
                   help="inpaint only the region around the mask at --width/--height, then paste it back")
    i.add_argument("--only-masked-padding", type=int, default=32, metavar="PX",
                   help="pixels around the mask that --only-masked includes (default 32)")
    g.add_argument("--latents", type=Path, help=".npy initial noise of shape (B, 4, H/8, W/8)")
    c = g.add_argument_group("ControlNet (repeat the group for several units; a single value applies to all)")
    c.add_argument("--control-image", type=Path, action="append", default=[], metavar="PNG",
                   help="control image (or the preprocessor's input)")
    c.add_argument("--controlnet", action="append", default=[], metavar="NAME", help="an exported ControlNet")
    c.add_argument("--control-scale", type=float, action="append", default=[], help="weight (default 1.0)")
    c.add_argument("--control-start", type=float, action="append", default=[], help="default 0.0")
    c.add_argument("--control-end", type=float, action="append", default=[], help="default 1.0")
    c.add_argument("--control-preprocessor", action="append", default=[], help="none (default) or canny")
    c.add_argument("--control-resize", action="append", default=[],
                   help='"Just Resize", "Crop and Resize" (default) or "Resize and Fill"')
    c.add_argument("--control-mode", action="append", default=[],
                   help='"Balanced" (default), "My prompt is more important" or "ControlNet is more important"')
    g.add_argument("--lora", type=_lora, action="append", default=[], metavar="NAME_OR_PATH[:WEIGHT]",
                   help="apply a LoRA .safetensors (a name in --lora-dir, or a path) at WEIGHT (default 1.0); "
                        "repeatable")
    g.add_argument("--lora-dir", type=Path, help="folder of LoRA files that --lora NAME refers to")
    g.add_argument("--embeddings-dir", type=Path, help="textual-inversion embeddings (A1111's embeddings folder)")
    g.add_argument("--runtime", default="auto")
    g.add_argument("--precision", choices=["fp32", "fp16", "int8"])
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--device", help="OpenVINO device: CPU, GPU, NPU (default CPU); TensorRT: GPU, GPU.1, ...")
    g.add_argument("--inference-precision", choices=["f32", "bf16", "f16"],
                   help="what OpenVINO computes in (default f32 on CPU; the CPU runs f16 as bf16 or f32)")
    g.add_argument("--output", type=Path, required=True, help="PNG path; batch image i > 0 gets a -i suffix")
    g.set_defaults(run=_generate)

    d = sub.add_parser("demo", help="offline: build a tiny random-weight model, export, generate, time it")
    d.add_argument("--out", type=Path, help="keep the demo's files here (default: a temp folder)")
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--size", type=int, default=128)
    d.set_defaults(run=_demo)

    v = sub.add_parser("serve", help="AUTOMATIC1111-compatible HTTP API (/sdapi/v1) over one or more exports")
    v.add_argument("models", type=Path, nargs="+", metavar="OUT", help="exported folders (the first is the default "
                   "checkpoint; clients switch with sd_model_checkpoint)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=7860)
    v.add_argument("--api-auth", type=_credentials, metavar="USER:PASS[,USER:PASS]", help="require HTTP Basic auth")
    v.add_argument("--runtime", default="auto")
    v.add_argument("--lora-dir", type=Path, help="LoRA folder for <lora:name:weight> in prompts")
    v.add_argument("--embeddings-dir", type=Path, help="textual-inversion embeddings (A1111's embeddings folder)")
    v.add_argument("--queue-size", type=int, default=32, help="requests that may wait; more get 503 (default 32)")
    v.add_argument("--outdir", type=Path, help="where requests with save_images write their PNGs")
    v.add_argument("--batch-requests", type=int, default=1, metavar="N",
                   help="run compatible waiting txt2img requests together, up to N images in one UNet batch "
                        "(default 1: one request at a time)")
    v.add_argument("--max-pixels", type=int, default=2048 * 2048, help="max width*height per image")
    v.add_argument("--max-steps", type=int, default=150)
    v.add_argument("--max-images", type=int, default=16, help="max batch_size*n_iter per request")
    v.add_argument("--max-body-mb", type=float, default=64, help="max request body size")
    v.add_argument("--threads", type=int, default=0, help="runtime intra-op threads per pipeline (default: the "
                   "runtime decides; with --ray: --cpus-per-replica)")
    r = v.add_argument_group("scale-out on Ray Serve (pip install 'sdrt[ray]')")
    r.add_argument("--ray", action="store_true", help="serve the same API as Ray Serve replicas behind Ray's proxy")
    r.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    r.add_argument("--min-replicas", type=int, help="autoscale between --min-replicas and --max-replicas")
    r.add_argument("--max-replicas", type=int)
    r.add_argument("--target-ongoing-requests", type=float, default=1.0, help="autoscaling aims at this many "
                   "requests (running + queued) per replica (default 1)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica reserves (default 1)")
    r.add_argument("--address", help="Ray cluster to join: auto, or ray://HEAD:10001 (default: start Ray here)")
    v.set_defaults(run=_serve)

    from .benchmark import add_parser as add_bench      # numpy-only module; peers load in subprocesses
    add_bench(sub)
    return p


def _export(args) -> int:
    from .exporters import ExportOptions, export
    options = ExportOptions(opset=args.opset, fp16=args.fp16, check_parity=not args.no_parity,
                            overwrite=args.overwrite, config=args.config, controlnets=tuple(args.controlnet),
                            tiling=args.tiling, tiny_vae=args.tiny_vae)
    manifest = export(args.model, args.out, options)
    nets = f"; ControlNets: {', '.join(manifest.controlnets)}" if manifest.controlnets else ""
    print(f"exported {args.model} -> {args.out} ({', '.join(manifest.components)}{nets})")
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
                           cfg=args.cfg, device=args.device, min_size=args.min_size, opt_size=args.opt_size,
                           max_size=args.max_size, max_batch=args.max_batch, prompt_chunks=args.prompt_chunks,
                           calibration_prompts=args.calibration_prompts,
                           calibration_size=args.calibration_size, calibration_steps=args.calibration_steps,
                           calibration_resolution=args.calibration_resolution, min_cosine=args.min_cosine,
                           min_psnr=args.min_psnr)
    entry = build(args.model, options)      # an int8 build below the thresholds logs a WARNING line
    print(f"built {args.model} for {args.backend} -> {entry}")
    record = json.loads((entry / "build.json").read_text())
    if "quality" in record:
        from .quantize.quality import describe
        print(describe(record["quality"]))
    if "compiled" in record:
        computes = sorted(set(record["compiled"]["inference_precision"].values()), key=str)
        print(f"compiled for {record['compiled']['device']}: computes in {'/'.join(map(str, computes))}")
    return 0


def _generate(args) -> int:
    import numpy as np

    from . import load
    from .pipelines.images import open_image
    from .pipelines.pipeline import Hires
    if args.mask and not args.init_image:
        raise InvalidRequest("--mask needs --init-image (the picture to inpaint)")
    openvino = {k: v for k, v in (("device", args.device), ("inference_precision", args.inference_precision)) if v}
    pipe = load(args.model, runtime=args.runtime, precision=args.precision, threads=args.threads,
                lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir, **openvino)
    if args.lora:
        pipe.set_loras(args.lora)
    kw = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance,
              sampler=args.sampler, scheduler=args.scheduler, seed=args.seed, batch_size=args.batch_size,
              rng=args.rng, clip_skip=args.clip_skip, emphasis=args.emphasis, tiled_vae=args.tiled_vae,
              tiling=args.tiling, vae=args.vae)
    kw |= {k: v for k, v in (("width", args.width), ("height", args.height)) if v is not None}
    kw |= _sdxl_conditioning(args)
    if args.latents:
        kw["latents"] = np.load(args.latents)
    if args.control_image or args.controlnet:
        kw["control"] = _controls(args)
    if args.hires_scale and args.init_image:
        raise InvalidRequest("--hires-scale is for txt2img (no --init-image)")
    if args.outpaint and (not args.init_image or args.mask):
        raise InvalidRequest("--outpaint needs --init-image and makes its own mask (no --mask)")
    if args.init_image:
        image = open_image(args.init_image)
        mode = int(args.resize_mode) if args.resize_mode.isdigit() else args.resize_mode
        if args.outpaint:
            result = pipe.outpaint(image, args.prompt, *args.outpaint, strength=_or(args.strength, 1.0), **kw)
        elif args.mask:
            result = pipe.inpaint(image, open_image(args.mask), args.prompt, strength=_or(args.strength, 1.0),
                                  resize_mode=mode, mask_blur=args.mask_blur, fill=args.inpainting_fill,
                                  invert_mask=args.invert_mask, only_masked=args.only_masked,
                                  padding=args.only_masked_padding, **kw)
        else:
            result = pipe.img2img(image, args.prompt, strength=_or(args.strength, 0.75), resize_mode=mode, **kw)
    else:
        hires = None if args.hires_scale is None else Hires(
            scale=args.hires_scale, upscaler=args.hires_upscaler, steps=args.hires_steps,
            strength=args.hires_strength)
        result = pipe.txt2img(args.prompt, hires=hires, **kw)
    for i, path in enumerate(_outputs(args.output, len(result))):
        result.save(path, i)
        print(f"{path}  seed {result.seeds[i]}")
    return 0


def _sdxl_conditioning(args) -> dict:
    """The SDXL conditioning flags given, as Request fields: sizes WxH and corners X,Y become diffusers'
    (height, width) and (top, left) pairs."""
    flipped = {"original_size": args.original_size, "crops_coords_top_left": args.crop_top_left,
               "target_size": args.target_size, "negative_original_size": args.negative_original_size,
               "negative_crops_coords_top_left": args.negative_crop_top_left,
               "negative_target_size": args.negative_target_size}
    scores = {"aesthetic_score": args.aesthetic_score, "negative_aesthetic_score": args.negative_aesthetic_score}
    return ({k: v[::-1] for k, v in flipped.items() if v is not None}
            | {k: v for k, v in scores.items() if v is not None})


def _controls(args) -> list:
    """One sdrt.Control per --control-image / --controlnet pair; the other flags given once or per unit."""
    from . import Control
    from .pipelines.images import open_image
    n = len(args.control_image)
    if len(args.controlnet) != n:
        raise InvalidRequest(f"give one --controlnet NAME per --control-image ({n} images, "
                             f"{len(args.controlnet)} ControlNets)")
    flags = {"scale": "scale", "start": "start", "end": "end", "preprocessor": "preprocessor",
             "resize_mode": "resize", "control_mode": "mode"}          # Control field -> --control-FLAG
    values = {field: getattr(args, f"control_{flag}") for field, flag in flags.items()}
    for field, v in values.items():
        if len(v) not in (0, 1, n):
            raise InvalidRequest(f"--control-{flags[field]} is given {len(v)} times; give it once or once per "
                                 f"--control-image ({n})")
    return [Control(image=open_image(image), model=name,
                    **{k: v[i if len(v) > 1 else 0] for k, v in values.items() if v})
            for i, (image, name) in enumerate(zip(args.control_image, args.controlnet))]


def _serve(args) -> int:
    try:
        from .server import Limits, ServerOptions, serve
    except ImportError as e:
        raise InvalidRequest(f"sdrt serve needs the server extra ({e.name} is missing): "
                             "pip install 'sdrt[server]'") from None
    if args.queue_size < 1:
        raise InvalidRequest(f"--queue-size must be >= 1, not {args.queue_size}")
    if args.batch_requests < 1:
        raise InvalidRequest(f"--batch-requests must be >= 1, not {args.batch_requests}")
    if args.outdir:
        args.outdir.mkdir(parents=True, exist_ok=True)
    limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
                    max_body_bytes=int(args.max_body_mb * (1 << 20)))
    options = ServerOptions(folders=tuple(args.models), host=args.host, port=args.port, auth=args.api_auth or (),
                            runtime=args.runtime, threads=args.threads, lora_dir=args.lora_dir,
                            embeddings_dir=args.embeddings_dir, queue_size=args.queue_size, limits=limits,
                            outdir=args.outdir,
                            batch_requests=args.batch_requests)
    if args.ray:
        from .server import ray_serve
        ray_serve.serve(options, _scale(args))
    else:
        given = [f for f in ("replicas", "min_replicas", "max_replicas", "address") if getattr(args, f) is not None]
        if given:
            raise InvalidRequest(f"--{given[0].replace('_', '-')} needs --ray")
        serve(options)
    return 0


def _scale(args):
    from .server.ray_serve import RayOptions
    if args.replicas is not None and args.min_replicas is not None:
        raise InvalidRequest("give --replicas (fixed) or --min-replicas/--max-replicas (autoscaling), not both")
    return RayOptions(replicas=1 if args.replicas is None else args.replicas, min_replicas=args.min_replicas,
                      max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                      address=args.address, cpus_per_replica=args.cpus_per_replica)


def _credentials(text: str) -> tuple[tuple[str, str], ...]:
    """argparse type for USER:PASS[,USER:PASS] (A1111's --api-auth)."""
    pairs = [item.partition(":") for item in text.split(",")]
    if any(not user or not sep for user, sep, _ in pairs):
        raise argparse.ArgumentTypeError(f"expected USER:PASS[,USER:PASS], not {text!r}")
    return tuple((user, password) for user, _, password in pairs)


def _lora(text: str) -> tuple[str, float]:
    """argparse type for NAME_OR_PATH[:WEIGHT]."""
    name, _, weight = text.rpartition(":")
    try:
        return (name, float(weight)) if name else (text, 1.0)
    except ValueError:                  # no weight, e.g. C:/loras/x.safetensors
        return text, 1.0


def _point(text: str) -> tuple[int, int]:
    """argparse type for X,Y pixels."""
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y pixels, e.g. 0,64; not {text!r}") from None
    return x, y


def _sides(text: str) -> tuple[int, int, int, int]:
    """argparse type for LEFT,RIGHT,TOP,BOTTOM pixel counts."""
    try:
        left, right, top, bottom = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT,TOP,BOTTOM pixels, e.g. 0,128,0,0; not {text!r}")
    return left, right, top, bottom


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
        if name in ("openvino", "tensorrt"):            # ONNX -> IR (compiled into its model cache) / engines
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
