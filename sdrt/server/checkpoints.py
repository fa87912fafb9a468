"""The exports a server offers, named as A1111 names checkpoints, loaded one at a time when first used."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .. import manifest as mf
from ..errors import InvalidRequest, ModelFolderError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """One export. ``sha256`` hashes its manifest (which holds every file's sha256), so it names the
    export's exact contents; ``hash`` is its first 10 digits, A1111's short model hash."""
    folder: Path
    model_name: str
    sha256: str
    controlnets: tuple[tuple[str, str], ...] = ()      # (name, sha256 of its ONNX graph), as exported

    @property
    def hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.model_name} [{self.hash}]"

    def describe(self) -> dict:
        """An entry of /sd-models."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": self.sha256,
                "filename": str(self.folder), "config": None}


def read(folder: Path) -> Checkpoint:
    """Describe an export without loading it (checks it is one)."""
    manifest = mf.read(folder, verify=False)
    digest = hashlib.sha256((folder / mf.MANIFEST).read_bytes()).hexdigest()
    nets = tuple((name, manifest.files.get(c.file, "")) for name, c in manifest.controlnets.items())
    return Checkpoint(folder, folder.resolve().name, digest, nets)


class Checkpoints:
    """The served exports; ``pipeline`` keeps the last one used loaded (call it from the worker only)."""

    def __init__(self, folders: list[Path], load: Callable[[Path], object]):
        if not folders:
            raise ModelFolderError("give at least one exported folder to serve")
        self.all = _distinct([read(Path(f)) for f in folders])
        self._load = load
        self._loaded: tuple[Checkpoint, object] | None = None

    def find(self, name: str) -> Checkpoint:
        """A checkpoint by title, name, short or full hash, or folder (what A1111 clients send)."""
        key = name.strip()
        for c in self.all:
            if key in (c.title, c.model_name, c.hash, c.sha256, str(c.folder)):
                return c
        raise InvalidRequest(f"sd_model_checkpoint {name!r} not found; served: "
                             f"{', '.join(c.title for c in self.all)}")

    def pipeline(self, checkpoint: Checkpoint):
        """The loaded pipeline of ``checkpoint``; loads it (dropping the previous one) when it is not."""
        if self._loaded is None or self._loaded[0] != checkpoint:
            self._loaded = None                    # free the previous model before loading the next
            log.info("loading %s", checkpoint.folder)
            self._loaded = (checkpoint, self._load(checkpoint.folder))
        return self._loaded[1]

    @property
    def current(self):
        """The loaded pipeline, None before the first generation."""
        return self._loaded[1] if self._loaded else None


def _distinct(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """Folders of the same name are named ``parent/name``, so clients can tell them apart."""
    names = [c.model_name for c in checkpoints]
    return [replace(c, model_name=f"{c.folder.resolve().parent.name}/{c.model_name}") if names.count(c.model_name) > 1
            else c for c in checkpoints]
