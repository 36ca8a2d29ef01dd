"""Sentence splitting for the benchmark's haystacks.

RULER's essay haystacks split text with ``nltk.sent_tokenize`` (Punkt). NLTK's punkt data cannot be
installed here (it downloads from a data hub, not PyPI), so the benchmark uses the library's rule-based
splitter, :func:`ctxopt.text.sentence_spans` (see that module for its rules and how it differs from Punkt).
"""
from __future__ import annotations

from ..text import sentence_spans


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped (a drop-in for ``nltk.sent_tokenize`` on English prose)."""
    return [text[a:b] for a, b in sentence_spans(text)]
