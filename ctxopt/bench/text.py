"""A regex sentence splitter.

RULER's essay haystacks split text with ``nltk.sent_tokenize`` (Punkt). NLTK's punkt data cannot be
installed here (it downloads from a data hub, not PyPI), so this module stands in for it with a rule-based
splitter. A boundary is a ``.``, ``!`` or ``?`` (with any closing quotes or brackets after it) followed by
whitespace and then something that can open a sentence (an upper-case letter, a digit or an opening
quote/bracket), or a blank line. No boundary is made after a known abbreviation ("Mr.", "e.g.", "U.S."),
after a single initial ("J. Smith"), or inside a number ("3.14" has no whitespace after its dot).
It agrees with Punkt on ordinary prose; Punkt's learned abbreviation and collocation statistics are not
reproduced, so sentence counts on the same text can differ slightly.
"""
from __future__ import annotations

import re

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


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped (a drop-in for ``nltk.sent_tokenize`` on English prose)."""
    return [text[a:b] for a, b in sentence_spans(text)]
