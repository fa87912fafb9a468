"""The weights one loaded export runs instead of its exported ones: LoRAs and explicit values (e.g. a token
embedding table extended by textual inversion), merged per component as W + sum_i w_i * delta_i, where W is
the explicit value or the exported weight. A component's runtime is reloaded only when its merged weights
change, and each original weight is read from the ONNX file once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InvalidRequest
from ..runtimes.base import Runtime
from . import weight_map
from .lora import Lora, Module, match, read_lora

LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")     # what LoRA files target (text_encoder_2: SDXL)
GROWABLE = "embeddings.token_embedding.weight"  # the one weight whose first axis may change: new tokens
# reload(component, initializer values or None for the exported weights) -> the component's new runtime
Reload = Callable[[str, "dict[str, np.ndarray] | None"], Runtime]


@dataclass(frozen=True)
class Applied:
    """A LoRA in use: the name it was asked for (A1111's infotext names it so), its file and weight."""
    name: str
    lora: Lora
    weight: float
    modules: dict[tuple[str, str], Module]          # (component, parameter) -> the module changing it


class WeightOverrides:
    """LoRAs and explicit weight values of one loaded export, applied by reloading changed components.

    Args:
        folder: the export folder.
        graphs: component -> its exported ONNX file (relative to ``folder``), where the weight maps are.
        precisions: component -> precision of the graph it runs; int8 builds cannot take new weights.
        reload: makes a component's runtime with some initializers replaced.
        model: the model's name, for error messages.
        lora_dir: where LoRA names are looked up (``<name>.safetensors``, subfolders too).
        twins: graph -> the component whose weights it shares and follows (``unet_control``, the UNet taking
            ControlNet residuals, follows ``unet``: same LoRAs, same values).
    """

    def __init__(self, folder: Path, graphs: dict[str, str], precisions: dict[str, str], reload: Reload,
                 model: str, lora_dir: Path | None = None, twins: dict[str, str] | None = None):
        self.folder, self.graphs, self.precisions, self.reload = Path(folder), graphs, precisions, reload
        self.twins = twins or {}
        self.model, self.lora_dir = model, None if lora_dir is None else Path(lora_dir)
        self.loras: list[Applied] = []
        self.values: dict[str, dict[str, np.ndarray]] = {}      # component -> parameter -> value
        self._maps: dict[str, dict[str, weight_map.Entry]] = {}
        self._originals: dict[tuple[str, str], np.ndarray] = {}
        self._read: dict[Path, tuple[tuple, Lora, dict]] = {}   # file -> ((mtime, size), Lora, modules)
        self._loaded: dict[str, tuple] = {}     # component -> recipe of the weights its runtime has

    def set_loras(self, loras: Sequence[tuple[str | Path, float]]) -> dict[str, Runtime]:
        """Use exactly these (name or path, weight) LoRAs; returns the components reloaded, by name."""
        maps = {c: self._map(c) for c in LORA_COMPONENTS if c in self.graphs} if loras else {}
        applied = []
        for name_or_path, weight in loras:
            name, path = self._find(name_or_path)
            lora, modules = self._lora(path, maps)
            applied.append(Applied(name, lora, float(weight), modules))
        previous, self.loras = self.loras, applied
        return self._apply(lambda: setattr(self, "loras", previous))

    def set_values(self, component: str, values: Mapping[str, np.ndarray]) -> dict[str, Runtime]:
        """Run ``component`` with these parameter values (torch names and layout) instead of the exported
        ones; the token embedding table may be longer (new tokens). Replaces the previous values of
        ``component``; an empty mapping restores the export's. Returns the components reloaded."""
        if component not in self.graphs or component in self.twins:
            raise InvalidRequest(f"no component {component!r}; this export has "
                                 f"{sorted(set(self.graphs) - set(self.twins))}")
        entries = self._map(component) if values else {}
        checked = {}
        for name, value in values.items():
            param = weight_map.canonical(name)
            entry = entries.get(param)
            if entry is None:
                raise InvalidRequest(f"{component} has no overridable weight {name!r} (Linear/Conv weights and "
                                     f"the token embedding are; e.g. {', '.join(sorted(entries)[:3])})")
            value = np.asarray(value)
            if value.shape != entry.shape and (param != GROWABLE or value.shape[1:] != entry.shape[1:]):
                raise InvalidRequest(f"{component}.{name}: shape {value.shape} does not fit the weight's "
                                     f"{entry.shape} (only the token embedding table may have more rows)")
            checked[param] = value
        previous = self.values.get(component, {})
        if checked.keys() == previous.keys() and all(np.array_equal(v, previous[k]) for k, v in checked.items()):
            return {}
        self.values[component] = checked
        return self._apply(lambda: self.values.__setitem__(component, previous))

    def original(self, component: str, name: str) -> np.ndarray:
        """The exported value of parameter ``name`` (torch name and layout) of ``component``."""
        param = weight_map.canonical(name)
        if param not in self._map(component):
            raise InvalidRequest(f"{component} has no overridable weight {name!r}")
        return self._original(component, param)

    def hashes(self) -> str | None:
        """A1111's ``Lora hashes`` infotext value, "name: hash12, ..." (':' and ',' dropped from names)."""
        named = {a.name.replace(":", "").replace(",", ""): a.lora.shorthash for a in self.loras}
        return ", ".join(f"{k}: {v}" for k, v in named.items()) or None

    # -- merging -------------------------------------------------------------------------------------

    def _apply(self, undo: Callable[[], None]) -> dict[str, Runtime]:
        """Reload every component whose recipe changed; on an error before reloading, ``undo`` the change."""
        try:
            changed = {c: r for c in self.graphs if (r := self._recipe(c)) != self._loaded.get(c, ())}
            int8 = [c for c, r in changed.items() if r and self.precisions.get(c) == "int8"]
            if int8:
                raise InvalidRequest(f"{', '.join(int8)} run an int8 build, whose weights are quantized; LoRAs "
                                     "and weight overrides need an fp32/fp16 build: load with precision='fp32'")
            merged = {c: self._merged(c) if r else None for c, r in changed.items()}
        except Exception:
            undo()
            raise
        reloaded = {}
        for component, recipe in changed.items():
            reloaded[component] = self.reload(component, merged.pop(component))
            self._loaded[component] = recipe
        return reloaded

    def _recipe(self, component: str) -> tuple:
        """What determines a component's merged weights (LoRA files and weights, explicit values)."""
        source = self.twins.get(component, component)
        loras = tuple((a.lora.path, self._read[a.lora.path][0], a.weight) for a in self.loras
                      if a.weight and any(c == source for c, _ in a.modules))
        values = self.values.get(source)
        return loras + ((tuple((k, id(v)) for k, v in sorted(values.items())),) if values else ())

    def _merged(self, component: str) -> dict[str, np.ndarray]:
        """Initializer name -> merged value, for every parameter of ``component`` that is not as exported."""
        entries, source = self._map(component), self.twins.get(component, component)
        merged = {p: v.astype(np.float32) for p, v in self.values.get(source, {}).items()}
        for a in self.loras:
            for (c, param), module in a.modules.items():
                if c != source or not a.weight:
                    continue
                base = merged[param] if param in merged else self._original(component, param).astype(np.float32)
                if base.shape != entries[param].shape:
                    raise InvalidRequest(f"LoRA {a.lora.path.name} changes {component}.{param}, which is "
                                         f"overridden with another shape {base.shape}")
                merged[param] = base + np.float32(a.weight) * module.delta(base.shape)
        return {entries[p].initializer: weight_map.stored(entries[p], v) for p, v in merged.items()}

    def _original(self, component: str, param: str) -> np.ndarray:
        key = (component, param)
        if key not in self._originals:
            self._originals[key] = weight_map.original(self.folder, self._map(component)[param])
        return self._originals[key]

    def _map(self, component: str) -> dict[str, weight_map.Entry]:
        if component not in self._maps:
            self._maps[component] = weight_map.read(self.folder, component, self.graphs[component])
        return self._maps[component]

    # -- LoRA files ----------------------------------------------------------------------------------

    def _find(self, name_or_path: str | Path) -> tuple[str, Path]:
        """(A1111 name, file) of a LoRA: a path as is, or a name looked up in ``lora_dir`` (A1111 style)."""
        text = str(name_or_path)
        is_path = isinstance(name_or_path, Path) or text.lower().endswith(".safetensors") or "/" in text \
            or "\\" in text
        if is_path or self.lora_dir is None:
            path = Path(text)
            if not path.is_file():
                where = "" if is_path else "; no lora_dir was given to look names up in (sdrt.load(..., lora_dir=))"
                raise InvalidRequest(f"LoRA {text}: no such file{where}")
            return path.stem, path
        path = self.lora_dir / f"{text}.safetensors"
        if not path.is_file():
            path = min(self.lora_dir.rglob(f"{text}.safetensors"), default=None)
        if path is None:
            raise InvalidRequest(f"LoRA {text!r}: no {text}.safetensors in {self.lora_dir}")
        return text, path

    def _lora(self, path: Path, maps: dict) -> tuple[Lora, dict]:
        """The LoRA in ``path`` and the modules it changes, re-read only when the file changed."""
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._read.get(path)
        if cached is None or cached[0] != stamp:
            lora = read_lora(path)
            cached = (stamp, lora, match(lora, maps, self.model))
            self._read[path] = cached
        return cached[1], cached[2]
