"""Built artifacts in ``OUT/cache/<backend>/<key>/`` (DESIGN §2): build options, keys, atomic entries, lookup.

A builder writes an entry's files into a temporary folder; :func:`commit` writes ``build.json`` (the options,
the sha256 of every file, the backend version) last and renames the folder into place, so a killed build
never leaves an entry that :func:`newest` or :func:`find` would return. An entry whose ``build.json`` is
missing or whose files fail their sha256 is removed when met, never loaded. Shared by every backend that
builds (OpenVINO IR today, TensorRT engines later).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import InvalidRequest, ModelFolderError
from ..manifest import Manifest, sha256, verify_files
from ..specs import CLIP_LENGTH, VAE_FACTOR, ComponentSpec

log = logging.getLogger(__name__)

RECORD = "build.json"

# the graphs (by spec name) run on [uncond; cond] under classifier-free guidance: 2 rows per image
GUIDED = ("unet", "unet_sdxl", "unet_control", "unet_control_sdxl", "controlnet", "controlnet_sdxl")
DENOISERS = (*GUIDED, "unet_lcm")        # the graphs run once per image and step, on the whole prompt


def rows(spec_name: str, arch: dict, images: int, cfg: bool = True) -> int:
    """The batch a graph sees when the pipeline serves ``images`` images (pipelines/pipeline.py): the UNet and
    the ControlNets run [uncond; cond], 2 rows per image, under classifier-free guidance, and one row per image
    without it (``cfg`` False: models run at guidance_scale <= 1 such as SD-Turbo and SDXL-Turbo; always for an
    LCM-distilled UNet, whose guidance goes in through ``timestep_cond``); the text encoders encode one
    77-token chunk and the VAE one image at a time."""
    if spec_name not in DENOISERS:
        return 1
    return images * (2 if cfg and spec_name in GUIDED and not arch.get("time_cond_proj_dim") else 1)


def static_rebuild(command: str, spec_name: str, batch_rows: int, size: str | None, extra: str = "") -> str:
    """The ``sdrt build`` command (``command``: up to the backend, then ``extra`` flags) of a static build in
    which ``spec_name`` takes ``batch_rows`` rows at ``size`` (WIDTHxHEIGHT): for the UNet and ControlNets,
    ``--batch N`` with classifier-free guidance (2N rows) or ``--batch N --no-cfg`` (N rows, for models run at
    guidance_scale <= 1), whichever the rows allow; the text encoders and VAE, whose batch is 1 whatever the
    images, ``--batch N``."""
    static = f"{command} --static {size or 'WIDTHxHEIGHT'}"
    if spec_name not in DENOISERS:
        return f"`{static} --batch N{extra}` (N images per request)"
    if spec_name not in GUIDED:
        return f"`{static} --batch {batch_rows}{extra}`"
    unguided = f"`{static} --batch {batch_rows} --no-cfg{extra}` ({_images(batch_rows)} at guidance_scale <= 1)"
    if batch_rows % 2:
        return unguided
    return (f"`{static} --batch {batch_rows // 2}{extra}` ({_images(batch_rows // 2)} with guidance_scale > 1) "
            f"or {unguided}")


def _images(n: int) -> str:
    return f"{n} image{'s' if n > 1 else ''} per request"


@dataclass(frozen=True)
class BuildOptions:
    """What ``sdrt build`` builds. ``static`` fixes every input shape, for ``batch`` images of that size."""
    backend: str = "openvino"
    precision: str | None = None                # None: the export's own precision
    static: tuple[int, int] | None = None       # (width, height) in pixels; None keeps dynamic shapes
    batch: int | None = None                    # images per request; only with ``static`` (default 1)
    cfg: bool = True                            # the UNet runs [uncond; cond] (2 rows per image); False (--no-cfg):
                                                # one row per image, for models run at guidance_scale <= 1
    device: str = "CPU"
    # TensorRT's shape range of a dynamic build (None: sdrt.runtimes.trt_build's defaults)
    min_size: tuple[int, int] | None = None     # (width, height) in pixels
    opt_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    max_batch: int | None = None                # images per request, up to
    prompt_chunks: int | None = None            # 77-token prompt chunks the UNet takes, up to
    # --precision int8 only (None: the defaults of sdrt.quantize.calibration.CalibrationOptions)
    calibration_prompts: Path | None = None     # prompt file, one per line; None: sdrt's own prompt set
    calibration_size: int | None = None         # prompts to calibrate on
    calibration_steps: int | None = None        # sampler steps per prompt
    calibration_resolution: tuple[int, int] | None = None   # (width, height); default: static, else native
    min_cosine: float = 0.95                    # below these, the int8 quality report warns
    min_psnr: float = 20.0

    def ranged(self) -> list[str]:
        """The TensorRT range flags given (``--min``, ``--opt``, ``--max``, ``--max-batch``, ``--prompt-chunks``)."""
        flags = {"--min": self.min_size, "--opt": self.opt_size, "--max": self.max_size,
                 "--max-batch": self.max_batch, "--prompt-chunks": self.prompt_chunks}
        return [flag for flag, v in flags.items() if v is not None]

    def check(self, factor: int = VAE_FACTOR) -> None:
        calibration = (self.calibration_prompts, self.calibration_size, self.calibration_steps,
                       self.calibration_resolution)
        if self.precision != "int8" and any(v is not None for v in calibration):
            raise InvalidRequest("the --calibration-* options only apply to --precision int8")
        if self.static is not None:
            width, height = self.static
            if width < factor or height < factor or width % factor or height % factor:
                raise InvalidRequest(f"--static {width}x{height}: width and height have to be positive "
                                     f"multiples of {factor}")
        elif self.batch is not None:
            raise InvalidRequest("--batch only applies to a static build; add --static WIDTHxHEIGHT")
        if self.batch is not None and self.batch < 1:
            raise InvalidRequest(f"--batch must be >= 1, not {self.batch}")
        ranged = {"--min": self.min_size, "--opt": self.opt_size, "--max": self.max_size,
                  "--max-batch": self.max_batch}
        given = [flag for flag, v in ranged.items() if v is not None]
        if given and self.static is not None:
            raise InvalidRequest(f"{', '.join(given)} set the range of a dynamic build; --static fixes one size "
                                 "(and --batch one batch): use one or the other")
        for flag, size in ranged.items():
            if flag != "--max-batch" and size is not None and (min(size) < factor or size[0] % factor
                                                               or size[1] % factor):
                raise InvalidRequest(f"{flag} {size[0]}x{size[1]}: width and height have to be positive "
                                     f"multiples of {factor}")
        for what, value in (("--max-batch", self.max_batch), ("--prompt-chunks", self.prompt_chunks)):
            if value is not None and value < 1:
                raise InvalidRequest(f"{what} must be >= 1, not {value}")


def static_shapes(spec: ComponentSpec, arch: dict, width: int, height: int, batch: int,
                  cfg: bool = True, chunks: int = 1) -> dict[str, tuple]:
    """The fixed input shapes of ``spec`` in a static build for ``batch`` images of width x height (``cfg``:
    with classifier-free guidance, see :func:`rows`). With ``chunks`` > 1 (``--prompt-chunks``) the token axis of
    the UNet and ControlNets is the one range (77, 77 x chunks): a prompt of 1 to ``chunks`` 77-token chunks,
    unpadded; every other axis stays fixed. Their batch is then one row per image, whatever ``cfg``: a prompt
    and a negative prompt of different lengths run in separate calls (pipelines/denoisers.py, as A1111), so the
    runtime serves [uncond; cond] as two calls of that batch (:mod:`sdrt.runtimes.openvino`)."""
    dims = symbols(spec.name, arch, batch, width, height, arch.get("model_max_length", CLIP_LENGTH),
                   cfg and chunks == 1)
    most = {**dims, "S": tokens(spec.name, chunks)} if chunks > 1 else dims
    return {t.name: tuple(a if a == b else (a, b) for a, b in zip(t.resolve(dims), t.resolve(most)))
            for t in spec.inputs}


def tokens(spec_name: str, chunks: int) -> int:
    """The token length of a prompt of ``chunks`` 77-token chunks as ``spec_name`` sees it: the UNet and the
    ControlNets take the whole prompt, the text encoders one chunk at a time."""
    return CLIP_LENGTH * (chunks if spec_name in DENOISERS else 1)


def symbols(spec_name: str, arch: dict, images: int, width: int, height: int, tokens: int,
            cfg: bool = True) -> dict[str, int]:
    """The value of every spec symbol for the graph ``spec_name`` serving ``images`` images of width x height
    with prompts of ``tokens`` tokens: the batch as :func:`rows`, the widths from the export's architecture."""
    return dict(B=rows(spec_name, arch, images, cfg), H=height, W=width, S=tokens, D=arch["cross_attention_dim"],
                C=arch["latent_channels"], CI=arch["unet_in_channels"], P=arch.get("text_embeds_dim", 0),
                T=arch.get("time_ids", 0), TC=arch.get("time_cond_proj_dim") or 1)


def sources(manifest: Manifest) -> dict[str, str]:
    """sha256 of every exported graph (and its external data) a build is made from."""
    return {rel: manifest.files[rel] for c in manifest.components.values()
            for rel in (c.file, c.file + "_data") if rel in manifest.files}


def entry_key(source_hashes: dict[str, str], options: dict, version: str) -> str:
    blob = json.dumps({"sources": source_hashes, "options": options, "version": version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find(folder: Path, entry: Path) -> dict | None:
    """The record of an intact entry; a broken one (no record, a file failing sha256) is removed."""
    try:
        record = json.loads((entry / RECORD).read_text())
        verify_files(folder, {str((entry / f).relative_to(folder)): h for f, h in record["files"].items()})
        return record
    except FileNotFoundError:
        if not entry.exists():
            return None
        problem = "no build record"
    except (ModelFolderError, ValueError, KeyError, TypeError) as e:
        problem = str(e)
    log.warning("removing the broken build %s (%s); it will be rebuilt", entry, problem)
    shutil.rmtree(entry, ignore_errors=True)
    return None


def newest(folder: Path, root: Path, match: Callable[[dict], bool]) -> tuple[Path, dict] | None:
    """The most recently built (or reused) intact entry under ``root`` whose record satisfies ``match``."""
    entries = [p for p in root.iterdir() if p.is_dir() and len(p.name) == 16] if root.is_dir() else []
    for entry in sorted(entries, key=_built_at, reverse=True):
        record = find(folder, entry)
        if record is not None and match(record):
            return entry, record
    return None


def _built_at(entry: Path) -> int:
    try:
        return (entry / RECORD).stat().st_mtime_ns
    except OSError:
        return 0


def touch(entry: Path) -> None:
    """Mark a reused entry as the newest, so ``sdrt build`` decides what the next load runs."""
    try:
        os.utime(entry / RECORD)
    except OSError:                 # read-only cache: the entry is still valid
        pass


def annotate(entry: Path, key: str, value) -> None:
    """Add ``key`` to a committed entry's record: facts learnt after the build, e.g. how it compiled.

    The record is replaced atomically; the files it lists are not touched, so the entry stays intact.
    """
    path = entry / RECORD
    record = {**json.loads(path.read_text()), key: value}
    tmp = entry / f".{RECORD}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError:                 # read-only cache: the entry is still valid
        tmp.unlink(missing_ok=True)


@contextmanager
def staging(root: Path, key: str) -> Iterator[Path]:
    """A temporary folder beside the final entry (same filesystem, so the rename is atomic)."""
    tmp = root / f".{key}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ModelFolderError(f"{root}: cannot write a build there ({e.strerror}); make the folder writable "
                               "or build a writable copy of the export") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # already renamed away on success


def commit(tmp: Path, entry: Path, record: dict) -> None:
    """Hash every file of ``tmp``, write the record last, then rename ``tmp`` to ``entry``."""
    record = {**record, "files": {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}}
    (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
    try:
        tmp.rename(entry)
    except OSError:                 # a concurrent build of the same key finished first: keep that one
        if not (entry / RECORD).is_file():
            raise
