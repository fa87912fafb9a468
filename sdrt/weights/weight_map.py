"""The weight map of an exported component, ``<component>.weights.json`` beside its graph (written by the
exporter): for every LoRA-targetable torch parameter, the ONNX initializer that holds it, whether it is stored
transposed, and where its bytes are. Run time reads original weights through it and hands merged ones to the
runtimes by initializer name. numpy only.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import ModelFolderError

FORMAT = 1
SUFFIX = ".weights.json"


@dataclass(frozen=True)
class Entry:
    initializer: str            # ONNX initializer name
    transposed: bool            # stored as the transpose of the torch weight (a bias-free Linear's MatMul)
    shape: tuple[int, ...]      # torch layout
    dtype: str                  # as stored in the graph: float32 or float16
    file: str                   # holds the bytes; relative to the graph's folder on disk, to the export once read
    offset: int                 # of the bytes in ``file``


def map_file(graph_file: str) -> str:
    """``unet.onnx`` -> ``unet.weights.json`` (paths relative to the export folder)."""
    return str(PurePosixPath(graph_file).with_suffix(SUFFIX))


def canonical(name: str) -> str:
    """A parameter name without the ``text_model.`` level that transformers 4.x CLIP models have and 5.x
    models lack, so LoRA files and weight maps of either agree."""
    return name.removeprefix("text_model.")


def write(path: Path, component: str, entries: dict[str, Entry]) -> None:
    weights = {name: asdict(e) for name, e in sorted(entries.items())}
    path.write_text(json.dumps({"format": FORMAT, "component": component, "weights": weights}, indent=1))


def read(folder: Path, component: str, graph_file: str) -> dict[str, Entry]:
    """The weight map of ``component`` (graph ``graph_file``) in the export ``folder``."""
    path = Path(folder) / map_file(graph_file)
    if not path.is_file():
        raise ModelFolderError(f"{folder}: {component} has no weight map ({path.name}), which LoRAs and weight "
                               f"overrides need; re-export the model with this sdrt (`sdrt export MODEL {folder}`)")
    try:
        raw = json.loads(path.read_text())
        if raw["format"] != FORMAT:
            raise ValueError(f"format {raw['format']}, this sdrt reads {FORMAT}")
        here = PurePosixPath(graph_file).parent
        return {name: Entry(**{**e, "shape": tuple(e["shape"]), "file": str(here / e["file"])})
                for name, e in raw["weights"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(f"{path} is not a valid weight map ({e}); re-export the model") from None


def original(folder: Path, entry: Entry) -> np.ndarray:
    """The exported value of a parameter, read from the ONNX file (or its external data), in torch layout."""
    shape = entry.shape[::-1] if entry.transposed else entry.shape
    count = int(np.prod(shape, dtype=np.int64))
    value = np.fromfile(Path(folder) / entry.file, dtype=entry.dtype, count=count, offset=entry.offset)
    if value.size != count:
        raise ModelFolderError(f"{folder}: {entry.file} ends before {entry.initializer}; re-export the model")
    value = value.reshape(shape)
    return value.T if entry.transposed else value


def stored(entry: Entry, value: np.ndarray) -> np.ndarray:
    """A torch-layout value as the graph stores it: transposed when the map says so, in the graph's dtype."""
    value = value.T if entry.transposed else value
    return np.ascontiguousarray(value, dtype=entry.dtype)
