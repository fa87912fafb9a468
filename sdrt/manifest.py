"""The exported folder's manifest (``sdrt.json``): what is in the folder and how to check it is intact.

Leaf module (json, hashlib). Exporters write it; ``sdrt.load`` reads and verifies it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelFolderError

FORMAT_VERSION = 1
MANIFEST = "sdrt.json"
VERIFIED = Path("cache") / "verified.json"     # (size, mtime) -> sha256 memo so loads don't rehash GBs


@dataclass(frozen=True)
class Component:
    spec: str                 # name of the ComponentSpec in sdrt.specs
    file: str                 # ONNX file, relative to the folder
    precision: str = "fp32"


@dataclass(frozen=True)
class Manifest:
    source: str
    architecture: dict        # latent_channels, unet_in_channels, vae_scaling_factor, prediction_type, ...
    components: dict[str, Component]
    files: dict[str, str] = field(default_factory=dict)    # relative path -> sha256, every file exported
    format: int = FORMAT_VERSION
    sdrt_version: str = ""
    # exported ControlNets (name -> graph) and the UNet taking their residuals; loaded only when used
    controlnets: dict[str, Component] = field(default_factory=dict)
    unet_control: Component | None = None
    tiling: dict[str, Component] = field(default_factory=dict)    # component -> its seamless-tiling graph

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST).write_text(manifest.to_json())


def read(folder: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read ``folder/sdrt.json``; with ``verify`` check that every listed file is present and unchanged."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such folder; create one with `sdrt export MODEL {folder}`")
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not an sdrt export (no {MANIFEST}); "
                               f"create one with `sdrt export MODEL {folder}`")
    try:
        raw = json.loads(path.read_text())
        raw["components"] = {k: Component(**v) for k, v in raw["components"].items()}
        raw["controlnets"] = {k: Component(**v) for k, v in raw.get("controlnets", {}).items()}
        raw["unet_control"] = Component(**raw["unet_control"]) if raw.get("unet_control") else None
        raw["tiling"] = {k: Component(**v) for k, v in raw.get("tiling", {}).items()}
        manifest = Manifest(**raw)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelFolderError(f"{path} is not a valid sdrt manifest ({e}); re-export the model") from None
    if manifest.format != FORMAT_VERSION:
        raise ModelFolderError(f"{folder} has export format {manifest.format}, this sdrt reads "
                               f"{FORMAT_VERSION}; re-export the model with this version")
    if verify:
        verify_files(folder, manifest.files)
    return manifest


def verify_files(folder: Path, files: dict[str, str]) -> None:
    memo_path = folder / VERIFIED
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    changed = False
    for rel, expected in files.items():
        p = folder / rel
        if not p.is_file():
            raise ModelFolderError(f"{folder}: {rel} is missing; the export is incomplete, re-export it")
        st = p.stat()
        key = f"{rel}:{st.st_size}:{st.st_mtime_ns}"
        if memo.get(key) != expected:
            if sha256(p) != expected:
                raise ModelFolderError(f"{folder}: {rel} does not match its sha256 in {MANIFEST}; "
                                       "the file was modified or corrupted, re-export the model")
            memo[key] = expected
            changed = True
    if changed:
        try:
            memo_path.parent.mkdir(exist_ok=True)
            memo_path.write_text(json.dumps(memo))
        except OSError:                 # read-only model folder: verification still happened
            pass
