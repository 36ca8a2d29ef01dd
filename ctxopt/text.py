"""Text utilities of the library: sentence spans, token counts and a stable hash.

``sentence_spans`` is a rule-based sentence splitter. A boundary is a ``.``, ``!`` or ``?`` (with any
closing quotes or brackets after it) followed by whitespace and then something that can open a sentence
(an upper-case letter, a digit or an opening quote/bracket), or a blank line. No boundary is made after a
known abbreviation ("Mr.", "e.g.", "U.S."), after a single initial ("J. Smith"), or inside a number ("3.14"
has no whitespace after its dot). It stands in for ``nltk.sent_tokenize`` (Punkt), whose data cannot be
installed from PyPI: it agrees with Punkt on ordinary prose, but Punkt's learned abbreviation and
collocation statistics are not reproduced, so sentence counts on the same text can differ slightly.

``count_tokens`` is the one way ctxopt counts tokens; ``stable_hash`` is the one hash behind every fixed
split and seeded order (the same value on every machine and Python run, unlike ``hash``).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .types import Passage

ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt ft vs etc al cf viz approx dept est fig figs gen gov sen rep rev hon
    capt col lt sgt maj cmdr adm inc ltd corp bros vol vols pp ed eds jan feb apr jun jul aug sep sept
    oct nov dec tue tues thu thur thurs fri""".split()
)  # undotted abbreviations that are not also common words ("us", "am", "no", "sun" end sentences)

# Candidate boundary: terminal punctuation, optional closing quotes/brackets, whitespace, then a sentence opener.
_BOUNDARY = re.compile(r"""[.!?]+["'”’)\]]*(?=\s+["'“‘(\[]*[A-Z0-9])""")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_WORD_BEFORE_DOT = re.compile(r"(?<![A-Za-z.])([A-Za-z][A-Za-z.]*)\.$")


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the '.' at index ``dot`` ends an abbreviation or an initial rather than a sentence."""
    match = _WORD_BEFORE_DOT.search(text, max(0, dot - 20), dot + 1)
    if match is None:
        return False
    word = match.group(1)
    if "." in word:  # a dotted abbreviation: "e.g.", "U.S.", "p.m."
        return True
    if len(word) == 1 and word.isupper():  # an initial: "J. Smith"
        return True
    return word.lower() in ABBREVIATIONS


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``, surrounding whitespace excluded."""
    cuts = {m.end() for m in _BLANK_LINE.finditer(text)}
    for m in _BOUNDARY.finditer(text):
        punct = m.group(0)
        if punct.startswith(".") and len(punct.rstrip("\"'”’)]")) == 1 and _is_abbreviation(text, m.start()):
            continue
        cuts.add(m.end())
    spans = []
    start = 0
    for cut in sorted(cuts) + [len(text)]:
        piece = text[start:cut]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        start = cut
    return spans


def count_tokens(tokenizer: Any, texts: str | Passage | Sequence[str | Passage]) -> int:
    """Tokens of ``texts`` (a str, a Passage, or a sequence of either, summed), special tokens not counted.

    ``tokenizer`` is a Hugging Face tokenizer (called once on the whole batch) or anything with a
    tiktoken-style ``encode(text)`` that adds no special tokens.
    """
    items = [texts] if isinstance(texts, str) or hasattr(texts, "text") else texts
    strings = [item if isinstance(item, str) else item.text for item in items]
    if not strings:
        return 0
    if callable(tokenizer):
        return sum(len(ids) for ids in tokenizer(strings, add_special_tokens=False)["input_ids"])
    return sum(len(tokenizer.encode(text)) for text in strings)


def stable_hash(text: str) -> int:
    """A 48-bit hash of ``text`` (the first 12 hex digits of its SHA-1): fixed across machines and runs."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


class StreamTrimmer:
    """Passes streamed pieces of an answer on so that, joined, they equal the whole answer without its outer
    whitespace, as ``Answer.text`` is: leading whitespace is dropped, trailing whitespace held until more text
    comes."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        text = self.held + piece
        out = text.rstrip()
        self.held = text[len(out):]
        return out
