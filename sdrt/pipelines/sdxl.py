"""SDXL's text conditioning: two CLIP text encoders per chunk, the pooled embedding and the time ids.

diffusers' ``StableDiffusionXLPipeline.encode_prompt`` is the reference: each text encoder's penultimate hidden
state (the raw layer output, no final LayerNorm) concatenated on the feature axis (CLIP ViT-L's 768 and
OpenCLIP ViT-bigG's 1280 in SDXL), and bigG's projected pooled output as ``text_embeds``. A1111's prompt
syntax works on top as A1111 does SDXL: every 77-token chunk goes through both encoders, each encoder's
output is weighted (emphasis, mean restored) on its own, and the pooled embedding is the first chunk's.
"""
from __future__ import annotations

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
             aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """(negative, positive) time ids, as diffusers' ``_get_add_time_ids``: original size + crop's top-left +
    target size, each (height, width); sizes default to the image's. The refiner
    (``requires_aesthetics_score``) takes the aesthetic score in place of the target size."""
    original = tuple(original_size or (height, width))
    target = tuple(target_size or (height, width))
    crop = tuple(crops_coords_top_left)
    if len(original) != 2 or len(target) != 2 or len(crop) != 2:
        raise InvalidRequest("original_size, target_size and crops_coords_top_left are (height, width) / "
                             "(top, left) pairs")
    if arch.get("requires_aesthetics_score"):
        negative, positive = original + crop + (negative_aesthetic_score,), original + crop + (aesthetic_score,)
    else:
        negative = positive = original + crop + target
    count = arch.get("time_ids", len(positive))
    if len(positive) != count:
        raise InvalidRequest(f"this UNet takes {count} time ids, not {len(positive)}; re-export the model")
    return np.array(negative, np.float32), np.array(positive, np.float32)
