"""SDXL's text conditioning: two CLIP text encoders per chunk, the pooled embedding and the time ids.

diffusers' ``StableDiffusionXLPipeline.encode_prompt`` is the reference: each text encoder's penultimate hidden
state (the raw layer output, no final LayerNorm) concatenated on the feature axis (CLIP ViT-L's 768 and
OpenCLIP ViT-bigG's 1280 in SDXL), and bigG's projected pooled output as ``text_embeds``. A1111's prompt
syntax works on top as A1111 does SDXL: every 77-token chunk goes through both encoders, each encoder's
output is weighted (emphasis, mean restored) on its own, and the pooled embedding is the first chunk's.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidRequest
from .conditioning import TextEncoder


class HiddenStateEncoder(TextEncoder):
    """One SDXL text encoder: the raw hidden state ``clip_skip`` layers before the last (1, the default: the
    penultimate, as SDXL was trained), and the pooled ``text_embeds`` of each chunk when the graph has them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embeds: dict[bytes, np.ndarray] = {}         # chunk ids -> its text_embeds

    def _clip(self, ids: np.ndarray) -> np.ndarray:
        out = self.runtime.run({"input_ids": ids[None]})
        if "text_embeds" in out:
            self.embeds[ids.tobytes()] = out["text_embeds"][0].astype(np.float32)
        return out["hidden_states"][-1 - self.options.clip_skip][0].astype(np.float32)

    def pooled(self, text: str) -> np.ndarray:
        """(P,) pooled ``text_embeds`` of ``text``'s first chunk."""
        first = self.chunks(text)[0][0]
        if first.tobytes() not in self.embeds:
            self.cache.pop(text, None)
            self(text)
        return self.embeds[first.tobytes()]


@dataclass
class SDXLTextEncoder:
    """Prompt text -> (77 * chunks, D1 + D2) hidden states and the (P,) pooled embedding.

    ``parts`` are the text encoders in the UNet's feature order (the refiner has only bigG, the last);
    ``zero_empty_negative`` is the model's ``force_zeros_for_empty_prompt``: an empty negative prompt is
    all zeros (hidden states and pooled), as diffusers does without a negative prompt and A1111 with "".
    """
    parts: list[HiddenStateEncoder]
    zero_empty_negative: bool = False
    cache: dict[str, np.ndarray] = field(default_factory=dict)

    def __call__(self, text: str) -> np.ndarray:
        if text not in self.cache:
            self.cache[text] = np.concatenate([part(text) for part in self.parts], axis=-1)
        return self.cache[text]

    def pooled(self, text: str) -> np.ndarray:
        return self.parts[-1].pooled(text)


def time_ids(arch: dict, height: int, width: int, original_size: tuple[int, int] | None = None,
             crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
             aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
             negative_original_size: tuple[int, int] | None = None,
             negative_crops_coords_top_left: tuple[int, int] | None = None,
             negative_target_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(negative, positive) time ids, as diffusers' ``_get_add_time_ids``: original size + crop's top-left +
    target size, each (height, width); sizes default to the image's. The refiner
    (``requires_aesthetics_score``) takes the aesthetic score in place of the target size. A ``negative_*``
    left None is the positive's value (as SGM and A1111 condition the negative prompt; diffusers' refiner
    pipeline alone defaults the negative crop to (0, 0))."""
    refiner = bool(arch.get("requires_aesthetics_score"))
    if refiner and (target_size is not None or negative_target_size is not None):
        raise InvalidRequest("the SDXL refiner takes no target size (its time ids are the original size, the "
                             "crop and the aesthetic score); remove target_size / negative_target_size")
    scores = ("aesthetic_score", "negative_aesthetic_score")
    if not refiner and (aesthetic_score, negative_aesthetic_score) != tuple(CONDITIONING_DEFAULTS[k] for k in scores):
        raise InvalidRequest("aesthetic_score and negative_aesthetic_score condition the SDXL refiner only; "
                             "this SDXL model takes a target size instead")
    original = _pair("original_size", original_size or (height, width))
    target = _pair("target_size", target_size or (height, width))
    crop = _pair("crops_coords_top_left", crops_coords_top_left)
    negative = (_pair("negative_original_size", negative_original_size or original),
                _pair("negative_crops_coords_top_left", negative_crops_coords_top_left or crop),
                _pair("negative_target_size", negative_target_size or target))
    if refiner:
        positive, negative = original + crop + (aesthetic_score,), negative[0] + negative[1] + (negative_aesthetic_score,)
    else:
        positive, negative = original + crop + target, negative[0] + negative[1] + negative[2]
    count = arch.get("time_ids", len(positive))
    if len(positive) != count:
        raise InvalidRequest(f"this UNet takes {count} time ids, not {len(positive)}; re-export the model")
    return np.array(negative, np.float32), np.array(positive, np.float32)


# Request fields of SDXL's size and aesthetic conditioning, with their defaults (what a non-SDXL model refuses)
CONDITIONING_DEFAULTS = {name: p.default for name, p in inspect.signature(time_ids).parameters.items()
                         if p.default is not inspect.Parameter.empty}


def _pair(name: str, value) -> tuple[float, float]:
    try:
        first, second = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} must be a pair of numbers: (height, width) for sizes, (top, left) for the "
                             f"crop; not {value!r}") from None
    if first < 0 or second < 0:
        raise InvalidRequest(f"{name} must not be negative, not {value!r}")
    return first, second
