"""A1111's prompt syntax, as text -> structure (no model involved).

- ``extra_networks``: ``<lora:name:0.8>`` tags, removed from the text before anything else.
- ``split_and``: composable diffusion, ``a cat AND a dog :0.5`` -> ``[("a cat", 1.0), ("a dog", 0.5)]``.
- ``schedule``: prompt editing ``[from:to:when]``, ``[add:when]``, ``[remove::when]`` and alternation
  ``[a|b]`` -> ``[(end_at_step, text), ...]`` (A1111's grammar, parsed with lark).
- ``parse_attention``: emphasis ``(word)``, ``[word]``, ``(word:1.3)``, escapes and ``BREAK`` ->
  ``[(text, weight), ...]``, with ``BREAK`` as ``("BREAK", -1.0)``.

Behaviour follows AUTOMATIC1111's ``modules/prompt_parser.py`` and ``modules/extra_networks.py``; the
examples in tests/pipelines/test_prompts.py are the ones A1111 documents.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

ROUND, SQUARE = 1.1, 1 / 1.1          # weight of (text) and [text]

RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
RE_AND = re.compile(r"\bAND\b")
RE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
RE_ATTENTION = re.compile(r"""
    \\[()\[\]\\]          # an escaped bracket or backslash: literal
  | \\                    # a lone backslash: literal
  | [(\[]                 # opening bracket
  | :\s*([+-]?[.\d]+)\s*\)   # explicit weight closing a round bracket
  | [)\]]                 # closing bracket
  | [^\\()\[\]:]+         # plain text
  | :                     # a colon that is not part of a weight
""", re.X)


@dataclass(frozen=True)
class ExtraNetwork:
    """One ``<kind:arg:arg...>`` tag, e.g. ``<lora:film_grain:0.7>`` -> kind "lora", args ("film_grain", "0.7")."""
    kind: str
    args: tuple[str, ...]


def extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """The prompt without its ``<kind:args>`` tags, and the tags in order of appearance."""
    found = [ExtraNetwork(m.group(1), tuple(m.group(2).split(":"))) for m in RE_EXTRA_NETWORK.finditer(prompt)]
    return RE_EXTRA_NETWORK.sub("", prompt), found


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Sub-prompts joined by ``AND``, each with its ``:weight`` suffix (default 1.0)."""
    parts = []
    for sub in RE_AND.split(prompt):
        text, weight = RE_WEIGHT.search(sub).groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Emphasis: ``(x)`` x1.1, ``[x]`` /1.1, ``(x:w)`` xw, nesting multiplies, unclosed brackets close at
    the end, ``\\(`` etc. are literal; runs of equal weight are merged; ``BREAK`` -> ``("BREAK", -1.0)``."""
    pieces: list[list] = []                 # [text, weight], mutable while brackets close
    rounds: list[int] = []                  # index into ``pieces`` where each open bracket started
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in RE_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif token == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:                               # text, or a bracket/weight with nothing open: literal
            for i, part in enumerate(RE_BREAK.split(token)):
                if i:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


# -- prompt editing ------------------------------------------------------------------------------------

GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@functools.cache
def _parser():
    import lark
    return lark.Lark(GRAMMAR)


def schedule(prompt: str, steps: int, first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """``[(end_at_step, text), ...]`` for ``steps`` steps: the text to use while step <= end_at_step.

    ``when`` with a decimal point is a fraction of ``steps``, an integer is a step number (A1111's current
    rule). For a hires fix's second pass (``first_pass_steps`` given) both count on from the first pass, as
    A1111 counts them: ``[a:b:25]`` after 20 first-pass steps switches at step 5, ``[a:b:1.5]`` half-way.
    Alternation ``[a|b]`` changes every step. A prompt that does not parse is used as it is.
    """
    import lark
    try:
        tree = _parser().parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    ends = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            number = node.children[-2]
            if "." in number:
                when = (float(number) - (1.0 if first_pass_steps else 0.0)) * steps
            else:
                when = float(number) - (first_pass_steps or 0)
            node.children[-2] = min(steps, int(when))
            if node.children[-2] >= 1:
                ends.add(node.children[-2])
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))
    return [(end, _text_at(tree, end)) for end in sorted(ends)]


def _text_at(tree, step: int) -> str:
    """The prompt text in effect at ``step`` (scheduled parts resolved, alternation picked)."""
    import lark

    def walk(node):
        if isinstance(node, lark.Token):
            yield str(node)
        elif node is None:
            return
        elif node.data == "scheduled":
            before, after, _, when, _ = node.children
            yield from walk(before if step <= when else after)
        elif node.data == "alternate":
            options = node.children
            yield from walk(options[(step - 1) % len(options)])
        else:
            for child in node.children:
                yield from walk(child)
    return "".join(walk(tree))


def at_step(entries: list[tuple[int, str]], step: int) -> int:
    """Index of the schedule entry used at 0-based model evaluation ``step`` (A1111's lookup)."""
    return next((i for i, (end, _) in enumerate(entries) if step <= end), 0)
