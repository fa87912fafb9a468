"""CLIP tokenization with the `tokenizers` library: ids padded to 77 as the text encoder expects."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..specs import CLIP_LENGTH

log = logging.getLogger(__name__)


class ClipTokenizer:
    """``tokenizer/tokenizer.json`` of an export, used as diffusers uses CLIPTokenizer (max_length padding)."""

    def __init__(self, folder: Path, bos: int, eos: int, pad: int):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self.bos, self.eos, self.pad = bos, eos, pad

    def tokens(self, text: str) -> list[int]:
        """BPE ids of ``text`` without BOS/EOS."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """(len(prompts), 77) int64 ids: BOS, up to 75 tokens, EOS, then padding."""
        rows = []
        for prompt in prompts:
            ids = self.tokens(prompt)
            if len(ids) > CLIP_LENGTH - 2:
                dropped = self.tokenizer.decode(ids[CLIP_LENGTH - 2:])
                log.warning("prompt is longer than %d tokens; truncated, dropping: %r", CLIP_LENGTH - 2, dropped)
                ids = ids[:CLIP_LENGTH - 2]
            row = [self.bos, *ids, self.eos]
            rows.append(row + [self.pad] * (CLIP_LENGTH - len(row)))
        return np.array(rows, dtype=np.int64)
