"""``sdrt bench``: per-component and end-to-end latency of an export on every sdrt runtime present, against
the peers (diffusers+torch, Optimum-Intel OpenVINO dynamic, static and hybrid int8, Optimum ONNX Runtime) on
the same model, size, steps, sampler and seed, in the same run (DESIGN §8). SD 1.x/2.x and SDXL exports (the
family in the export's ``sdrt.json``); few-step settings (``--sampler``, ``--scheduler sgm_uniform``,
guidance <= 1 without CFG, ``--vae tiny``) reach every system alike.

    sdrt bench OUT --size 256 --steps 20 --runs 3 --threads 2 --json bench.json --chart bench.png

Each measured system runs in its own process (:mod:`sdrt.benchmark.worker`), so its load time and peak RSS
are its own and a crashing peer is reported, not fatal. A peer whose package is missing is reported as
``not installed``; a peer installed in another environment is run with that environment's Python
(``--peer-python optimum-intel=/path/to/venv/bin/python``). Nothing here imports torch: only the worker of a
peer does (:mod:`sdrt.benchmark.peers`).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .. import manifest as mf
from .. import runtimes
from ..errors import BackendUnavailable, InvalidRequest, SdrtError
from ..quantize.calibration import read_prompts
from ..pipelines import samplers
from ..runtimes.openvino import INFERENCE_PRECISIONS
from . import report

log = logging.getLogger(__name__)

PEERS = ("diffusers", "optimum-intel", "optimum-intel-static", "optimum-onnxruntime", "optimum-intel-int8",
         "optimum-intel-int8-static")
DEFAULT_PEERS = PEERS[:4]       # the int8 peers calibrate for a long time (their conversion is cached)
VAES = ("full", "tiny")
PRECISIONS = ("fp32", "fp16", "int8")
ROOT = Path(__file__).resolve().parents[2]          # the folder holding the sdrt package, for peer Pythons


@dataclass(frozen=True)
class BenchOptions:
    """What ``sdrt bench`` measures and where it writes the results.

    ``runtimes``: sdrt runtimes to measure (empty: every installed one), each at every precision present.
    ``size``: (width, height) in pixels. ``runs``: measured repetitions after ``warmup`` unmeasured ones.
    ``threads``: intra-op threads for every system (0: each library's default). ``peers``: from
    :data:`PEERS`. ``interpreters``: peer (or package family, e.g. ``optimum-intel``) -> Python executable
    of the environment it is installed in (default: this one). ``source``: the diffusers folder the peers
    load (default: the ``source`` recorded in the export's ``sdrt.json``). ``timeout``: seconds per system.
    ``inference_precision``: what sdrt's OpenVINO runtime and the Optimum-Intel peers compute in (f32, bf16,
    f16), so both run alike; None: sdrt f32, Optimum-Intel its own default (bf16 on AVX512-BF16/AMX CPUs).
    ``sampler``/``scheduler``: sdrt's names (A1111's: "Euler a", "LCM"; "sgm_uniform" is diffusers'
    trailing timestep spacing, SD-Turbo's); the peers run the matching diffusers scheduler. ``vae``: "tiny"
    decodes with the export's tiny autoencoder (``sdrt export --tiny-vae``); the peers with the
    AutoencoderTiny folder ``tiny_vae_source``. ``int8_samples``: UNet calls the Optimum-Intel hybrid int8
    peer calibrates on (its own loop: 512x512 at most, 50 steps per prompt, sdrt's calibration prompts).
    """
    runtimes: tuple[str, ...] = ()
    size: tuple[int, int] = (512, 512)
    steps: int = 20
    guidance: float = 7.5
    batch: int = 1
    runs: int = 3
    warmup: int = 1
    threads: int = 0
    peers: tuple[str, ...] = DEFAULT_PEERS
    json: Path | None = None
    markdown: Path | None = None
    chart: Path | None = None
    interpreters: Mapping[str, str] = field(default_factory=dict)
    source: Path | None = None
    seed: int = 1
    sampler: str = "Euler a"
    scheduler: str | None = None
    vae: str = "full"
    tiny_vae_source: Path | None = None
    int8_samples: int = 50
    prompt: str = "a photograph of an astronaut riding a horse"
    timeout: float | None = None
    inference_precision: str | None = None
    progress: bool = True

    def check(self) -> None:
        width, height = self.size
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise InvalidRequest(f"--size {width}x{height}: width and height have to be positive multiples of 8")
        for name, value, low in (("steps", self.steps, 1), ("runs", self.runs, 1), ("warmup", self.warmup, 0),
                                 ("batch", self.batch, 1), ("threads", self.threads, 0),
                                 ("int8-samples", self.int8_samples, 1)):
            if value < low:
                raise InvalidRequest(f"--{name} must be >= {low}, not {value}")
        unknown = sorted(set(self.peers) - set(PEERS))
        if unknown:
            raise InvalidRequest(f"unknown peers {unknown}; choose from {', '.join(PEERS)} (or none)")
        if self.vae not in VAES:
            raise InvalidRequest(f"--vae {self.vae}: choose from {', '.join(VAES)}")
        samplers.resolve_name(self.sampler, self.scheduler)         # an unknown name says which exist
        if self.inference_precision not in (None, *INFERENCE_PRECISIONS):
            raise InvalidRequest(f"--inference-precision {self.inference_precision}: choose from "
                                 f"{', '.join(INFERENCE_PRECISIONS)}")


def run(folder: str | Path, options: BenchOptions = BenchOptions()) -> dict:
    """Measure every system; write the JSON/Markdown/chart files that ``options`` names; return the results.

    Returns a dict with ``settings``, ``machine``, ``systems`` (one entry per system: status, load_s,
    components, e2e, peak_rss_bytes, versions ...), ``ratios`` and ``markdown``.
    """
    options.check()
    folder = Path(folder).resolve()
    manifest = mf.read(folder)
    if options.vae == "tiny" and "vae_decoder_tiny" not in manifest.components:
        raise InvalidRequest(f"--vae tiny: {folder} has no tiny autoencoder; export it with "
                             f"`sdrt export MODEL OUT --tiny-vae madebyollin/taesd` (taesdxl for SDXL)")
    settings = _settings(folder, manifest, options)
    jobs = _sdrt_jobs(folder, manifest, options) + _peer_jobs(folder, settings, options)
    systems, images = [], []
    with _bar(len(jobs), options.progress) as bar, tempfile.TemporaryDirectory(prefix="sdrt-bench-") as pictures:
        for name, spec, python in jobs:
            bar.set_postfix_str(name)
            images.append(str(Path(pictures) / f"{len(images)}.png"))
            if spec is not None and "status" not in spec:
                spec = {**spec, "image_out": images[-1]}
            systems.append(measure(name, spec, python, settings, options))
            bar.update(1)
        compare_images(systems, images)
    results = {"settings": settings, "machine": report.machine(), "systems": systems}
    results["ratios"] = report.ratios(systems)
    results["markdown"] = report.markdown(results)
    _write(results, options)
    return results


def measure(name: str, spec: dict | None, python: str, settings: dict, options: BenchOptions) -> dict:
    """One system: its worker's result, with the export step first for the Optimum peers."""
    if spec is None or "status" in spec:                 # known before any process starts
        return {"name": name, **(spec or {})}
    extra = {}
    if spec["kind"] == "peer" and spec["peer"] != "diffusers":       # Optimum: convert (cached), then load
        exported = _worker({**spec, "mode": "export"}, python, options.timeout)
        if exported.get("status") != "ok":
            return {"name": name, **exported}
        spec = {**spec, "model_dir": exported["model_dir"]}
        extra = {"export_s": exported["export_s"]}
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    result = _worker(spec, python, options.timeout)
    return {"name": name, "kind": spec["kind"], **extra, **result, "wall_s": time.perf_counter() - began,
            "loadavg_1min": [load_before, os.getloadavg()[0]]}


def compare_images(systems: list[dict], paths: list[str | None]) -> None:
    """Each system's last image against the first measured sdrt system's (same model, settings and seed, so
    a peer running what sdrt runs differs by precision only): ``image_diff`` = mean and max |difference| in
    0-255 pixel values, and that reference's name."""
    import numpy as np
    from PIL import Image

    def pixels(path):
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) if path and Path(path).is_file() else None
    found = [(s, pixels(p)) for s, p in zip(systems, paths) if s.get("status") == "ok"]
    reference = next(((s, a) for s, a in found if s.get("kind") == "sdrt" and a is not None), None)
    if reference is None:
        return
    for system, image in found:
        if image is not None and image.shape == reference[1].shape:
            diff = np.abs(image - reference[1])
            system["image_diff"] = {"vs": reference[0]["name"], "mean": float(diff.mean()), "max": int(diff.max())}


def _settings(folder: Path, manifest: mf.Manifest, options: BenchOptions) -> dict:
    width, height = options.size
    return {"folder": str(folder), "source": str(options.source or manifest.source), "width": width,
            "height": height, "steps": options.steps, "guidance": options.guidance, "batch": options.batch,
            "runs": options.runs, "warmup": options.warmup, "threads": options.threads, "seed": options.seed,
            "sampler": options.sampler, "scheduler": options.scheduler, "vae": options.vae,
            "family": manifest.architecture.get("family", "sd1"), "prompt": options.prompt,
            "weight_format": manifest.components["unet"].precision,       # the export's; the peers store the same
            "inference_precision": options.inference_precision, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _sdrt_jobs(folder: Path, manifest: mf.Manifest, options: BenchOptions) -> list[tuple]:
    """(name, spec, python) for every requested runtime at every precision it can run from this folder."""
    names = options.runtimes or [n for n in runtimes.BACKENDS if _installed(n)]
    if not names:
        raise BackendUnavailable("no sdrt runtime installed; `pip install sdrt[onnxruntime]`")
    jobs = []
    for name in names:
        try:
            backend = runtimes.backend(name)
        except BackendUnavailable as e:
            jobs.append((f"sdrt {name}", {"kind": "sdrt", "status": "not installed", "error": str(e)}, ""))
            continue
        locate = getattr(backend, "artifacts", None)
        for precision in PRECISIONS:
            try:
                components = locate(folder, manifest, precision) if locate else manifest.components
            except SdrtError:           # TensorRT runs built engines only: no build at this precision
                continue
            unet = components.get("unet")       # a build's precision is its UNet's (SDXL --fp16 keeps an fp32 VAE)
            if unet is not None and unet.precision == precision:
                spec = {"kind": "sdrt", "runtime": name, "precision": precision,
                        **_shared(options, folder)}
                jobs.append((f"sdrt {name} {precision}", spec, sys.executable))
    return jobs


def _peer_jobs(folder: Path, settings: dict, options: BenchOptions) -> list[tuple]:
    source = Path(settings["source"])
    cls, kwargs = samplers.DIFFUSERS_EQUIVALENT[samplers.resolve_name(options.sampler, options.scheduler)]
    if samplers.schedule_kind(options.scheduler) == "sgm_uniform":
        kwargs = {**kwargs, "timestep_spacing": "trailing"}           # as samplers.plan runs it
    tiny = options.tiny_vae_source
    jobs = []
    for peer in options.peers:
        python = (options.interpreters.get(peer) or options.interpreters.get(peer.removesuffix("-static"))
                  or options.interpreters.get(_package_family(peer)))
        if not (source / "model_index.json").is_file():
            spec = {"kind": "peer", "status": "skipped",
                    "error": f"the source {source} is not a local diffusers folder; pass --source DIR"}
        elif options.vae == "tiny" and not (tiny and (Path(tiny) / "config.json").is_file()):
            spec = {"kind": "peer", "status": "skipped",
                    "error": "--vae tiny: pass --tiny-vae-source DIR (the AutoencoderTiny folder the export used)"}
        else:
            spec = {"kind": "peer", "peer": peer, "source": str(source), "cache_dir": str(_peer_cache(folder)),
                    "family": settings["family"], "weight_format": settings["weight_format"],
                    "scheduler_class": [cls, kwargs],
                    "tiny_vae_source": str(tiny) if options.vae == "tiny" else None,
                    **_shared(options, folder)}
            if "-int8" in peer:
                spec |= {"int8_samples": options.int8_samples, "calibration_prompts": read_prompts()}
        jobs.append((peer, spec, python or sys.executable))
    return jobs


def _package_family(peer: str) -> str:
    """The package a peer comes from (``optimum-intel-int8-static`` -> ``optimum-intel``), for --peer-python."""
    return "optimum-intel" if peer.startswith("optimum-intel") else peer


def _shared(options: BenchOptions, folder: Path) -> dict:
    width, height = options.size
    return {"folder": str(folder), "width": width, "height": height, "steps": options.steps,
            "guidance": options.guidance, "batch": options.batch, "runs": options.runs, "warmup": options.warmup,
            "threads": options.threads, "seed": options.seed, "sampler": options.sampler,
            "scheduler": options.scheduler, "vae": options.vae, "prompt": options.prompt,
            "inference_precision": options.inference_precision}


def _peer_cache(folder: Path) -> Path:
    """Where the Optimum peers keep their one-time conversion: OUT/cache/bench, or a temp dir if read-only."""
    cache = folder / "cache" / "bench"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return cache
    except OSError:
        return Path(tempfile.gettempdir()) / "sdrt-bench-peers"


def _installed(name: str) -> bool:
    try:
        runtimes.backend(name)
    except BackendUnavailable:
        return False
    return True


def _worker(spec: dict, python: str, timeout: float | None) -> dict:
    """Run one worker process; its JSON result, or a ``failed`` entry naming why (exit code, stderr tail)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run([python, "-m", "sdrt.benchmark.worker", json.dumps(spec)], env=env,
                                  stdout=subprocess.PIPE, stderr=err, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout:g} s"}
        except OSError as e:
            return {"status": "failed", "error": f"cannot start {python}: {e}"}
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-20:]
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        log.warning("bench worker failed (exit %s):\n%s", proc.returncode, "\n".join(tail))
        return {"status": "failed", "error": f"worker exited with {proc.returncode}: {tail[-1] if tail else ''}"}
    result = json.loads(lines[-1])
    if result.get("status") == "failed":
        log.warning("bench %s failed:\n%s", spec.get("peer") or spec.get("runtime"), "\n".join(tail))
    return result


def _write(results: dict, options: BenchOptions) -> None:
    if options.json:
        Path(options.json).write_text(json.dumps({k: v for k, v in results.items() if k != "markdown"}, indent=2))
    if options.markdown:
        Path(options.markdown).write_text(results["markdown"])
    if options.chart:
        note = report.chart(results, Path(options.chart))
        if note:
            results["markdown"] += f"\n{note}\n"


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="bench", unit="system", disable=None if enabled else True, leave=False)


# -- command line -----------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    """Add the ``bench`` subcommand to ``sdrt``'s subparsers; its handler builds BenchOptions and calls run."""
    b = subparsers.add_parser("bench", help="latency per component and end to end, against diffusers/Optimum")
    b.add_argument("model", type=Path, help="an exported folder")
    b.add_argument("--runtime", action="append", default=[], metavar="NAME",
                   help="sdrt runtime to measure, repeatable (default: every installed one, every precision)")
    b.add_argument("--size", type=_size, default=(512, 512), metavar="N|WIDTHxHEIGHT", help="default 512")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--guidance", type=float, default=7.5)
    b.add_argument("--batch", type=int, default=1, help="images per request")
    b.add_argument("--runs", type=int, default=3, help="measured runs; the median is reported")
    b.add_argument("--warmup", type=int, default=1, help="unmeasured runs first")
    b.add_argument("--threads", type=int, default=0, help="intra-op threads for every system (0: default)")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--sampler", default="Euler a", help='sdrt sampler name, e.g. "Euler a", "LCM" (default Euler a)')
    b.add_argument("--scheduler", help="schedule type: automatic, karras or sgm_uniform (diffusers' trailing "
                                       "timestep spacing, SD-Turbo's); default automatic")
    b.add_argument("--vae", choices=VAES, default="full",
                   help="tiny: decode with the export's tiny autoencoder (sdrt export --tiny-vae)")
    b.add_argument("--tiny-vae-source", type=Path, metavar="DIR",
                   help="--vae tiny: the AutoencoderTiny folder the peers decode with (the one the export used)")
    b.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                   help=f"comma list of {', '.join(PEERS)}, or none (default: {','.join(DEFAULT_PEERS)})")
    b.add_argument("--int8-samples", type=int, default=50, metavar="N",
                   help="optimum-intel-int8: UNet calls to calibrate on (its loop: 50 steps per prompt)")
    b.add_argument("--peer-python", action="append", default=[], metavar="PEER=PYTHON",
                   help="run a peer with another environment's Python, e.g. optimum-intel=/venv/bin/python")
    b.add_argument("--source", type=Path, help="diffusers folder for the peers (default: the export's source)")
    b.add_argument("--timeout", type=float, help="seconds allowed per system")
    b.add_argument("--inference-precision", choices=INFERENCE_PRECISIONS,
                   help="what sdrt's OpenVINO runtime and the Optimum-Intel peers compute in (default: sdrt f32, "
                        "Optimum-Intel its own: bf16 on AVX512-BF16/AMX CPUs)")
    b.add_argument("--json", type=Path, help="write all raw numbers and the machine's facts here")
    b.add_argument("--markdown", type=Path, help="write the Markdown table here")
    b.add_argument("--chart", type=Path, help="write a PNG bar chart here (needs matplotlib)")
    b.set_defaults(run=_bench)


def _bench(args) -> int:
    peers = () if args.peers.strip().lower() in ("", "none") else tuple(p.strip() for p in args.peers.split(","))
    pairs = [item.split("=", 1) for item in args.peer_python]
    if any(len(p) != 2 for p in pairs):
        raise InvalidRequest("--peer-python takes PEER=PYTHON, e.g. optimum-intel=/venv/bin/python")
    options = BenchOptions(runtimes=tuple(r for arg in args.runtime for r in arg.split(",") if r),
                           size=args.size, steps=args.steps, guidance=args.guidance, batch=args.batch,
                           runs=args.runs, warmup=args.warmup, threads=args.threads, peers=peers,
                           json=args.json, markdown=args.markdown, chart=args.chart, interpreters=dict(pairs),
                           source=args.source, seed=args.seed, timeout=args.timeout,
                           inference_precision=args.inference_precision, sampler=args.sampler,
                           scheduler=args.scheduler, vae=args.vae, tiny_vae_source=args.tiny_vae_source,
                           int8_samples=args.int8_samples)
    results = run(args.model, options)
    print(results["markdown"])
    if not any(s.get("status") == "ok" for s in results["systems"] if s.get("kind") == "sdrt"):
        raise SdrtError("no sdrt runtime could be measured; see the table above")
    return 0


def _size(text: str) -> tuple[int, int]:
    import argparse
    try:
        values = [int(v) for v in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or WIDTHxHEIGHT such as 512x512, not {text!r}")
    return (values[0], values[-1])


__all__ = ["BenchOptions", "run", "add_parser", "PEERS", "DEFAULT_PEERS"]
