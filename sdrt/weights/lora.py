"""LoRA files read with numpy: kohya/A1111 (``lora_unet_*``/``lora_te_*`` modules with ``lora_down``,
``lora_up`` and ``alpha``; Linear, 1x1 and 3x3 Conv, LoCon included) and diffusers/PEFT (``unet.*``/
``text_encoder.*`` with ``lora_A``/``lora_B``), matched to an export's weight maps and turned into deltas
``scale * up @ down`` with scale = alpha / rank (Hu et al. 2021, LoRA, eq. 3 and §4.1).
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidRequest
from .sgm import sgm_paths
from .weight_map import Entry

# key suffix -> part of a LoRA module; kohya first, then diffusers' older and PEFT spellings
PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
         "lora.down.weight": "down", "lora.up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up"}
# how each component's modules are named in LoRA files: kohya prefix (dots become "_"), PEFT prefix
PREFIXES = {"unet": ("lora_unet_", "unet."), "text_encoder": ("lora_te_", "text_encoder."),
            "text_encoder_2": ("lora_te2_", "text_encoder_2.")}                    # SDXL's OpenCLIP-G
KOHYA_ALIASES = {"text_encoder": "lora_te1_"}         # kohya's SDXL files name CLIP-L "te1" (SDXL models only)
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
SHOWN = 4                       # keys quoted in an error message


@dataclass(frozen=True)
class Module:
    """One low-rank update: up (out, rank[, 1, 1]) @ down (rank, in[, kh, kw])."""
    down: np.ndarray
    up: np.ndarray
    alpha: float | None = None

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether up @ down has the size of a weight of ``shape`` (Linear, or Conv of any kernel)."""
        rank, out = self.down.shape[0], self.up.shape[0]
        return self.up.size == out * rank and out == shape[0] and out * (self.down.size // rank) == np.prod(shape)

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """The weight update (alpha / rank) * up @ down, float32, in the weight's ``shape`` (which it fits)."""
        rank = self.down.shape[0]
        d = self.up.reshape(-1, rank).astype(np.float32) @ self.down.reshape(rank, -1).astype(np.float32)
        scale = 1.0 if self.alpha is None else self.alpha / rank
        return (d * np.float32(scale)).reshape(shape)


@dataclass(frozen=True)
class Lora:
    path: Path
    shorthash: str                      # A1111's: 12 hex digits of sshs_model_hash, else of the sha256 of the
                                        # bytes after the header (kohya's "addnet" hash)
    modules: dict[str, Module]          # by module name as written in the file (lora_unet_..., unet....)
    unsupported: tuple[str, ...]        # keys of kinds not applied (LoHa, LoKr, DoRA, Tucker mid, norms...)


def read_lora(path: Path) -> Lora:
    """Read a ``.safetensors`` LoRA file; InvalidRequest if it is not one."""
    tensors, metadata, data = read_safetensors(path)
    groups, unsupported = {}, []
    for key, value in tensors.items():
        part = next((p for p in PARTS if key.endswith("." + p)), None)
        if part is None:
            unsupported.append(key)
            continue
        groups.setdefault(key[:-len(part) - 1], {})[PARTS[part]] = value
    modules = {}
    peft_alpha = peft_alphas(metadata)
    for name, parts in groups.items():
        if "down" in parts and "up" in parts:
            alpha = parts.get("alpha")
            modules[name] = Module(parts["down"], parts["up"], peft_alpha(name) if alpha is None else float(alpha))
        else:
            unsupported += [f"{name}.{p}" for p in parts]
    if not modules:
        raise InvalidRequest(f"LoRA {path}: no lora_down/lora_up (or lora_A/lora_B) weights in it; sdrt applies "
                             "kohya/A1111 and diffusers/PEFT LoRAs (LoCon included), not LoHa/LoKr/other kinds")
    shorthash = (metadata.get("sshs_model_hash") or hashlib.sha256(data).hexdigest())[:12]   # kohya's addnet hash
    return Lora(Path(path), shorthash, modules, tuple(sorted(unsupported)))


def peft_alphas(metadata: dict):
    """module name -> its alpha from the PEFT configs diffusers saves in a file's metadata
    (``lora_adapter_metadata``: ``<component>.lora_alpha``, and ``alpha_pattern`` by module name), or None:
    no alpha means alpha = rank, as PEFT defaults."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        config = {}

    def alpha(name: str) -> float | None:
        component, _, module = name.partition(".")
        patterns = config.get(f"{component}.alpha_pattern") or {}
        key = next((k for k in patterns if module == k or module.endswith("." + k)), None)
        value = patterns[key] if key else config.get(f"{component}.lora_alpha")
        return None if value is None else float(value)
    return alpha


def read_safetensors(path: Path, what: str = "LoRA") -> tuple[dict[str, np.ndarray], dict, bytes]:
    """Tensors (float32/16/64; bf16 widened to float32), metadata and the bytes after the header of a
    ``.safetensors`` file: an 8-byte header length, a JSON header, then the raw little-endian tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > path.stat().st_size - 8:
                raise ValueError("its header length points past the end of the file")
            header = json.loads(f.read(size))
            data = f.read()
    except (OSError, ValueError, struct.error) as e:
        raise InvalidRequest(f"{what} {path}: not a readable .safetensors file ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for key, t in header.items():
        if t.get("dtype") not in SAFETENSORS_DTYPES:
            raise InvalidRequest(f"{what} {path}: tensor {key} has dtype {t.get('dtype')}, sdrt reads "
                                 f"{', '.join(SAFETENSORS_DTYPES)}")
        dtype = np.dtype(SAFETENSORS_DTYPES[t["dtype"]])
        start, end = t["data_offsets"]
        value = np.frombuffer(data, dtype, (end - start) // dtype.itemsize, start).reshape(t["shape"])
        if t["dtype"] == "BF16":                    # the upper half of a float32
            value = (value.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = value
    return tensors, metadata, data


def module_names(maps: dict[str, dict[str, Entry]]) -> dict[str, tuple[str, str]]:
    """LoRA module name (kohya and PEFT spellings) -> (component, parameter), for every mapped weight.

    Built from the weight maps' parameter names, so it names exactly the modules the export has; the text
    encoder's are also spelled with transformers 4.x's ``text_model.`` level, as LoRA files write them.
    """
    names = {}
    for component, entries in maps.items():
        kohya, peft = PREFIXES[component]
        for param in entries:
            module = param.removesuffix(".weight")
            for path in ([module, f"text_model.{module}"] if component.startswith("text_encoder") else [module]):
                names[kohya + path.replace(".", "_")] = names[peft + path] = (component, param)
                if component in KOHYA_ALIASES and "text_encoder_2" in maps:        # SDXL models only
                    names[KOHYA_ALIASES[component] + path.replace(".", "_")] = (component, param)
    if "text_encoder_2" in maps and "unet" in maps:          # SDXL: kohya's files spell the UNet as SGM does
        modules = {param.removesuffix(".weight"): param for param in maps["unet"]}
        for module, path in sgm_paths(list(modules)).items():
            names.setdefault(PREFIXES["unet"][0] + path.replace(".", "_"), ("unet", modules[module]))
    return names


def match(lora: Lora, maps: dict[str, dict[str, Entry]], model: str) -> dict[tuple[str, str], Module]:
    """(component, parameter) -> the module of ``lora`` that changes it.

    InvalidRequest, naming the file and the counts, unless every module matches a weight of this model by
    name and shape (a LoRA for another architecture, e.g. SDXL or SD 2.x, matches none or only part).
    """
    names = module_names(maps)
    found, unknown, misshaped = {}, [], []
    for name, module in lora.modules.items():
        target = names.get(name)
        if target is None:
            unknown.append(name)
        elif not module.fits(maps[target[0]][target[1]].shape):
            misshaped.append(name)
        else:
            found[target] = module
    if unknown or misshaped or lora.unsupported:
        problems = [f"{len(unknown)} match no module of the model (e.g. {', '.join(unknown[:SHOWN])})"
                    if unknown else "",
                    f"{len(misshaped)} have other shapes than its weights (e.g. {', '.join(misshaped[:SHOWN])})"
                    if misshaped else "",
                    f"{len(lora.unsupported)} keys are of kinds sdrt does not apply "
                    f"(e.g. {', '.join(lora.unsupported[:SHOWN])})" if lora.unsupported else ""]
        raise InvalidRequest(f"LoRA {lora.path.name} does not fit {model}: {len(found)} of {len(lora.modules)} "
                             f"modules match; {'; '.join(p for p in problems if p)}. Is it for another base "
                             "model (SDXL, SD 2.x)?")
    return found
