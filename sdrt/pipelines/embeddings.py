"""Textual-inversion embeddings, as A1111's ``embeddings`` folder holds them.

An embedding file teaches the text encoder a word: its file name (without extension) used in a prompt
stands for ``n`` learned token-embedding vectors. sdrt appends every loaded embedding's vectors to the text
encoder's token-embedding table (ids ``vocab``, ``vocab + 1``, ...) and, when a prompt's tokens spell an
embedding's name, puts those ids in their place, so the exported CLIP graph runs unchanged.

Formats (A1111's ``textual_inversion.create_embedding_from_data``): ``.safetensors`` with ``emb_params`` or
one tensor (diffusers' ``learned_embeds``); ``.pt``/``.bin`` pickles with ``string_to_param`` or one tensor
(read with torch, when installed). SDXL files hold ``clip_l`` and ``clip_g`` tensors, one per text encoder
(CLIP ViT-L, OpenCLIP bigG): an SDXL model extends both tables, each with its own part (the refiner, bigG
only, with ``clip_g``); an SD 1.x/2.x model takes the ``clip_l`` part. Both SDXL tokenizers are the same
CLIP BPE, so one name spells the same token ids, which get the same new ids in both tables.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidRequest
from ..weights.lora import read_safetensors

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: np.ndarray             # (n, D) float32; an SDXL file's clip_l part
    path: Path
    vectors_g: np.ndarray | None = None     # an SDXL file's clip_g part (n, D2), for SDXL's text_encoder_2

    def part(self, second: bool) -> np.ndarray | None:
        """The vectors for SDXL's second text encoder (``second``), else the first's."""
        return self.vectors_g if second else self.vectors


def read(path: Path) -> Embedding:
    """One embedding file; InvalidRequest when it holds no single embedding."""
    path = Path(path)
    try:
        data = _tensors(path)
    except InvalidRequest:
        raise
    except Exception as e:          # safetensors / torch raise their own errors on damaged files
        raise InvalidRequest(f"embedding {path}: cannot be read ({e})") from None
    if "clip_l" in data and "clip_g" in data:
        clip_l, clip_g = _vectors(path, data["clip_l"]), _vectors(path, data["clip_g"])
        if len(clip_l) != len(clip_g):
            raise InvalidRequest(f"embedding {path}: clip_l has {len(clip_l)} vectors and clip_g {len(clip_g)}; "
                                 "an SDXL embedding has as many for both text encoders")
        return Embedding(path.stem, clip_l, path, clip_g)
    if "string_to_param" in data:
        data = dict(data["string_to_param"])
    elif "emb_params" in data:
        data = {"emb_params": data["emb_params"]}
    tensors = [v for v in data.values() if hasattr(v, "shape")]
    if len(tensors) != 1:
        raise InvalidRequest(f"embedding {path}: expected one tensor of token vectors, found keys {sorted(data)}")
    return Embedding(path.stem, _vectors(path, tensors[0]), path)


def _vectors(path: Path, tensor) -> np.ndarray:
    vectors = np.asarray(tensor, dtype=np.float32)
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2:
        raise InvalidRequest(f"embedding {path}: vectors of shape {vectors.shape}, expected (tokens, width)")
    return vectors


def _tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return read_safetensors(path, "embedding")[0]
    try:
        import torch
    except ImportError:
        raise InvalidRequest(f"embedding {path}: .pt/.bin files are torch pickles and need torch installed; "
                             "convert it to .safetensors to use it without torch") from None
    data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:
        data = {**data, "string_to_param": {k: v.detach().float().numpy()
                                            for k, v in dict(data["string_to_param"]).items()}}
    return {k: (v.detach().float().numpy() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}


def read_folder(folder: Path, width: int | None, width_g: int | None = None) -> tuple[list[Embedding], list[Path]]:
    """Every embedding file under ``folder`` whose vectors are ``width`` wide (SDXL: ``clip_l`` ``width`` and
    ``clip_g`` ``width_g`` wide; the refiner has no ``width``); the others are skipped (another model family,
    or unreadable) and returned with a warning, as A1111 lists them."""
    loaded, skipped = [], []
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix in SUFFIXES and p.is_file()):
        try:
            emb = read(path)
        except InvalidRequest as e:
            log.warning("%s; skipped", e)
            skipped.append(path)
            continue
        if width_g is not None and emb.vectors_g is None:
            log.warning("embedding %s is not an SDXL embedding (no clip_l/clip_g); skipped", path)
            skipped.append(path)
            continue
        found, wanted = _widths(emb, width_g is not None), (width, width_g)
        if any(w is not None and f != w for f, w in zip(found, wanted)):
            log.warning("embedding %s has %s-wide vectors, the text encoders %s; skipped", path,
                        "/".join(str(f) for f, w in zip(found, wanted) if w is not None),
                        "/".join(str(w) for w in wanted if w is not None))
            skipped.append(path)
            continue
        loaded.append(emb)
    return loaded, skipped


def _widths(emb: Embedding, sdxl: bool) -> tuple[int, int | None]:
    return emb.vectors.shape[1], (emb.vectors_g.shape[1] if sdxl else None)


class Vocabulary:
    """Embeddings by the token ids that spell their names, with the ids their vectors get in the table."""

    def __init__(self, embeddings: list[Embedding], tokenize, vocab_size: int):
        self.embeddings = embeddings
        self.by_first: dict[int, list[tuple[tuple[int, ...], list[int]]]] = {}
        next_id = vocab_size
        for emb in embeddings:
            spelled = tuple(tokenize(emb.name))
            ids = list(range(next_id, next_id + len(emb.vectors)))
            next_id += len(emb.vectors)
            if spelled:
                self.by_first.setdefault(spelled[0], []).append((spelled, ids))
        for candidates in self.by_first.values():
            candidates.sort(key=lambda c: -len(c[0]))          # the longest name wins

    def match(self, tokens: list[int], position: int) -> tuple[list[int], int] | None:
        """(ids to insert, tokens consumed) when an embedding's name starts at ``position``."""
        for spelled, ids in self.by_first.get(tokens[position], ()):
            if tuple(tokens[position:position + len(spelled)]) == spelled:
                return ids, len(spelled)
        return None

    def table(self, original: np.ndarray, second: bool = False) -> np.ndarray:
        """The token-embedding table extended by every embedding's vectors, in id order (``second``: SDXL's
        text_encoder_2 table, extended by the ``clip_g`` vectors)."""
        return np.concatenate([original.astype(np.float32), *(e.part(second) for e in self.embeddings)])
