"""Prompt text -> the UNet's ``encoder_hidden_states``, the way A1111 builds them.

A prompt is parsed for emphasis (``prompts.parse_attention``), tokenized piece by piece and packed into
chunks of 75 tokens (``BREAK`` starts a new chunk; a chunk that fills up moves the text after its last
comma, if recent, to the next one). Each chunk becomes ``BOS + 75 + EOS`` and goes through CLIP on its own;
the chunks' outputs are weighted and concatenated on the token axis: ``(77 * chunks, D)``.

Per request, :class:`Conditioning` holds a schedule of such arrays for the negative prompt and for each
``AND`` sub-prompt, and hands the denoiser the blocks in effect at each model evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidRequest
from ..runtimes.base import Runtime
from ..specs import CLIP_LENGTH
from . import prompts
from .embeddings import Vocabulary
from .tokenizer import ClipTokenizer

CHUNK = CLIP_LENGTH - 2                  # prompt tokens per chunk, between BOS and EOS
EMPHASIS = ("Original", "No norm", "Ignore", "None")


@dataclass(frozen=True)
class TextOptions:
    """A1111's settings that shape the text conditioning."""
    clip_skip: int = 1                   # 1 = last layer; N takes the N-th hidden state from the end
    emphasis: str = "Original"           # Original | No norm | Ignore | None
    comma_padding_backtrack: int = 20    # tokens a chunk may move to the next one at a comma (0 = off)

    def check(self, layers: int) -> None:
        if not 1 <= self.clip_skip <= layers:
            raise InvalidRequest(f"clip_skip must be between 1 and {layers} for this text encoder, "
                                 f"not {self.clip_skip}")
        if self.emphasis not in EMPHASIS:
            raise InvalidRequest(f"emphasis must be one of {', '.join(EMPHASIS)}, not {self.emphasis!r}")
        if not 0 <= self.comma_padding_backtrack <= CHUNK:
            raise InvalidRequest(f"comma_padding_backtrack must be between 0 and {CHUNK}, "
                                 f"not {self.comma_padding_backtrack}")


@dataclass
class TextEncoder:
    """Tokenizer + CLIP runtime, with a cache of encoded texts (one per request: weights may change)."""
    tokenizer: ClipTokenizer
    runtime: Runtime
    options: TextOptions = TextOptions()
    vocabulary: Vocabulary | None = None          # textual-inversion embeddings
    cache: dict[str, np.ndarray] = field(default_factory=dict)

    def __call__(self, text: str) -> np.ndarray:
        """(77 * chunks, D) float32 embeddings of one prompt (no AND, no scheduling syntax left)."""
        if text not in self.cache:
            ids, weights = self.chunks(text)
            self.cache[text] = np.concatenate([self._emphasize(self._clip(row), w) for row, w in zip(ids, weights)])
        return self.cache[text]

    def _clip(self, ids: np.ndarray) -> np.ndarray:
        """(77, D) output of one chunk (one call per chunk: static builds fix the text encoder's batch at 1)."""
        out = self.runtime.run({"input_ids": ids[None]})
        z = out["last_hidden_state"] if self.options.clip_skip == 1 else out["hidden_states"][-self.options.clip_skip]
        return z[0].astype(np.float32)

    def chunks(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(chunks, 77) int64 token ids and float32 weights of ``text``."""
        emphasis = self.options.emphasis
        pieces = prompts.parse_attention(text) if emphasis != "None" else [(text, 1.0)]
        tokenized = [None if (t, w) == ("BREAK", -1.0) else (self.tokenizer.tokens(t), w) for t, w in pieces]
        comma = self.tokenizer.tokens(",")[0]
        chunks = pack(tokenized, comma, self.options.comma_padding_backtrack, self.vocabulary)
        rows = [self._wrap(ids, ws) for ids, ws in chunks]
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        weights = np.array([r[1] for r in rows], dtype=np.float32)
        return ids, (np.ones_like(weights) if emphasis == "Ignore" else weights)

    def _wrap(self, ids: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
        """BOS + ids + EOS, padded to 77 with EOS then the pad id after the first EOS (SD 2's OpenCLIP)."""
        t = self.tokenizer
        row = [t.bos, *ids, t.eos] + [t.pad] * (CHUNK - len(ids))
        return row, [1.0, *weights] + [1.0] * (CLIP_LENGTH - 1 - len(weights))

    def _emphasize(self, z: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Scale each token's output by its weight; "Original" restores the chunk's mean afterwards."""
        if self.options.emphasis in ("Ignore", "None") or np.all(weights == 1.0):
            return z
        scaled = z * weights[:, None]
        if self.options.emphasis == "Original" and scaled.mean() != 0:
            scaled *= z.mean() / scaled.mean()
        return scaled


def pack(pieces: list[tuple[list[int], float] | None], comma: int, backtrack: int,
         vocabulary: Vocabulary | None = None) -> list[tuple[list, list]]:
    """Token ids with weights -> chunks of at most 75 (A1111's ``tokenize_line``). ``None`` is BREAK.

    When a chunk is full and a comma lies within the last ``backtrack`` tokens, the tokens after that comma
    move to the next chunk, so a phrase is not cut in two. A textual-inversion embedding's name is replaced
    by its vector ids, never split across chunks.
    """
    chunks: list[tuple[list, list]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close():
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for piece in pieces:
        if piece is None:
            close()
            continue
        tokens, weight = piece
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved
            if len(ids) == CHUNK:
                close()
            found = vocabulary.match(tokens, position) if vocabulary else None
            inserted, consumed = found or ([token], 1)
            if len(ids) + len(inserted) > CHUNK:
                close()
            ids += inserted
            weights += [weight] * len(inserted)
            position += consumed
    if ids or not chunks:
        close()
    return chunks


def stack(blocks: list[np.ndarray]) -> list[np.ndarray]:
    """Bring embeddings to the longest's token count by repeating each one's last vector (A1111's
    ``stack_conds``, used for the ``AND`` sub-prompts of one prompt)."""
    n = max(len(b) for b in blocks)
    return [np.concatenate([b, np.repeat(b[-1:], n - len(b), axis=0)]) for b in blocks]


@dataclass
class Conditioning:
    """The text conditioning of one request, per model evaluation.

    ``uncond`` is the negative prompt's schedule (None without guidance); ``conds`` holds each ``AND``
    sub-prompt's schedule and weight. A schedule is ``[(end_at_step, embeddings), ...]``.
    """
    uncond: list[tuple[int, np.ndarray]] | None
    conds: list[tuple[list[tuple[int, np.ndarray]], float]]
    batch_size: int = 1
    # SDXL: the pooled text embeddings' schedules laid out as (uncond, [cond_1, ...]), and the
    # (negative, positive) time ids; the UNet gets them besides each block (``added``)
    pooled: tuple[list | None, list[list]] | None = None
    time_ids: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def build(cls, encode: TextEncoder, prompt: str, negative_prompt: str, steps: int, guidance: bool,
              batch_size: int = 1, first_pass_steps: int | None = None,
              time_ids: tuple[np.ndarray, np.ndarray] | None = None) -> Conditioning:
        """``first_pass_steps``: this is a hires fix's second pass (prompt editing counts on from the first).
        An encoder with a ``pooled`` method (SDXL) also gives each text's pooled embedding; ``time_ids`` go
        with them."""
        def scheduled(text, f=encode):
            return [(end, f(t)) for end, t in prompts.schedule(text, steps, first_pass_steps)]
        subprompts = prompts.split_and(prompt)
        if len(subprompts) > 1:
            guidance = True                         # composable diffusion weighs against the uncond
        uncond = scheduled(negative_prompt) if guidance else None
        conds = [(scheduled(text), weight) for text, weight in subprompts]
        pooled = getattr(encode, "pooled", None)
        if pooled is None:
            return cls(uncond, conds, batch_size)
        pooled_uncond = scheduled(negative_prompt, pooled) if guidance else None
        if guidance and negative_prompt == "" and getattr(encode, "zero_empty_negative", False):
            uncond = [(end, np.zeros_like(z)) for end, z in uncond]
            pooled_uncond = [(end, np.zeros_like(p)) for end, p in pooled_uncond]
        return cls(uncond, conds, batch_size, (pooled_uncond, [scheduled(t, pooled) for t, _ in subprompts]),
                   time_ids)

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.conds]

    @property
    def plain(self) -> bool:
        """No uncond and one sub-prompt of weight 1: the model output is used as it is."""
        return self.uncond is None and self.weights == [1.0]

    def blocks(self, step: int) -> list[np.ndarray]:
        """[uncond, cond_1, ...] in effect at 0-based model evaluation ``step``, each (B, S, D)."""
        conds = stack([_at(s, step) for s, _ in self.conds])
        blocks = ([_at(self.uncond, step)] if self.uncond is not None else []) + conds
        return [np.repeat(b[None], self.batch_size, axis=0) for b in blocks]

    def added(self, step: int) -> list[dict[str, np.ndarray]]:
        """SDXL: the UNet's ``text_embeds`` (B, P) and ``time_ids`` (B, T) for each block of ``blocks(step)``."""
        uncond, conds = self.pooled
        negative, positive = self.time_ids
        rows = ([(_at(uncond, step), negative)] if uncond is not None else []) + \
            [(_at(s, step), positive) for s in conds]
        return [{"text_embeds": np.repeat(p[None], self.batch_size, axis=0),
                 "time_ids": np.repeat(t[None], self.batch_size, axis=0)} for p, t in rows]


def _at(schedule: list[tuple[int, np.ndarray]], step: int) -> np.ndarray:
    return schedule[prompts.at_step(schedule, step)][1]


@dataclass
class RowConditioning:
    """The conditioning of a batch whose images have prompts of their own: one :class:`Conditioning` per
    image (row), their blocks stacked row by row, so the rows still share each UNet call.

    The rows must agree on everything but the text: guidance, the ``AND`` weights and, at every step, each
    block's token count (prompts of 1 to 75 tokens always do); otherwise this raises InvalidRequest.
    """
    rows: list[Conditioning]
    steps: int

    def __post_init__(self):
        first = self.rows[0]
        same = all(r.weights == first.weights and r.plain == first.plain for r in self.rows) and all(
            len({tuple(b.shape for b in r.blocks(step)) for r in self.rows}) == 1 for step in range(self.steps + 1))
        if not same:
            raise InvalidRequest("the prompts of one batch must have the same AND sub-prompts and weights, and "
                                 "encode to the same number of 75-token chunks; run them as separate requests")

    @property
    def weights(self) -> list[float]:
        return self.rows[0].weights

    @property
    def plain(self) -> bool:
        return self.rows[0].plain

    def blocks(self, step: int) -> list[np.ndarray]:
        return [np.concatenate(row_blocks) for row_blocks in zip(*(r.blocks(step) for r in self.rows))]

    @property
    def pooled(self):
        return self.rows[0].pooled

    def added(self, step: int) -> list[dict[str, np.ndarray]]:
        return [{k: np.concatenate([d[k] for d in row_dicts]) for k in row_dicts[0]}
                for row_dicts in zip(*(r.added(step) for r in self.rows))]
