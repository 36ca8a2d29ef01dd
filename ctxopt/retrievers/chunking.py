"""Split text into overlapping, token-sized passages whose spans point back into the source.

Chunks are sized in the tokens of the tokenizer that will embed them, so they fit its length limit.
Each chunk's text is exactly ``document[span[0]:span[1]]``: boundaries come from the tokenizer's offset
mapping, never from re-joined tokens. Consecutive chunks share exactly ``overlap`` tokens.

Where a chunk ends: at most ``chunk_tokens`` tokens in, but within the last 20% of that length the latest
paragraph break is preferred, then the latest sentence end (``.``, ``!``, ``?``, ``…`` or a line break),
then the latest word boundary; only when the window holds none of these is a word cut.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

from ..checks import require_int
from ..errors import InputError
from ..types import Passage
from .corpus import iter_corpus

# Share of a chunk, at its end, searched for a better place to cut.
BOUNDARY_WINDOW = 0.2
_SENTENCE_END = ".!?…"
_CLOSERS = "\"')]}”’»"


def chunk_text(
    text: str,
    tokenizer: Any,
    chunk_tokens: int = 200,
    overlap: int = 40,
    source: str = "",
    offset: int = 0,
    metadata: dict[str, Any] | None = None,
) -> list[Passage]:
    """Split ``text`` into passages of at most ``chunk_tokens`` tokens, ``overlap`` tokens shared.

    ``offset`` is where ``text`` starts in its source document, so spans are document positions.
    Steps: tokenize with offsets, walk the tokens a chunk at a time, cut each chunk at the best boundary
    near its end, and start the next chunk ``overlap`` tokens before that cut.
    """
    _check_sizes(chunk_tokens, overlap)
    spans = _token_spans(text, tokenizer)
    passages: list[Passage] = []
    first, count = 0, len(spans)
    while first < count:
        end = min(first + chunk_tokens, count)
        if end < count:
            earliest = first + max(overlap + 1, math.ceil((1 - BOUNDARY_WINDOW) * chunk_tokens))
            end = _best_cut(text, spans, earliest, end)
        start_char, end_char = spans[first][0], spans[end - 1][1]
        passages.append(
            Passage(
                text=text[start_char:end_char],
                source=source,
                span=(offset + start_char, offset + end_char),
                metadata=dict(metadata or {}),
            )
        )
        if end == count:
            break
        first = end - overlap
    return passages


def chunk_corpus(
    folder: str | os.PathLike[str], tokenizer: Any, chunk_tokens: int = 200, overlap: int = 40
) -> Iterator[Passage]:
    """Chunk every document of a corpus folder (see :func:`~ctxopt.retrievers.corpus.iter_corpus`).

    Large files arrive in pieces; chunking runs across piece boundaries as if the file were whole: the
    last chunk of each piece is held back and its text re-chunked together with the next piece.
    """
    _check_sizes(chunk_tokens, overlap)
    documents = iter_corpus(folder)
    return _chunk_documents(documents, tokenizer, chunk_tokens, overlap)


def _chunk_documents(documents: Iterator[Any], tokenizer: Any, chunk_tokens: int, overlap: int) -> Iterator[Passage]:
    """Chunk each document piece by piece, carrying the unfinished tail into the next piece."""
    for document in documents:
        source, metadata = document.source, document.metadata
        carry, carry_offset = "", 0
        for piece_offset, piece in document.pieces:
            if not carry:
                carry_offset = piece_offset
            text = carry + piece
            chunks = chunk_text(text, tokenizer, chunk_tokens, overlap, source, carry_offset, metadata)
            if not chunks:
                carry = ""
                continue
            yield from chunks[:-1]
            tail_start = chunks[-1].span[0]
            carry = text[tail_start - carry_offset :]
            carry_offset = tail_start
        if carry:
            yield from chunk_text(carry, tokenizer, chunk_tokens, overlap, source, carry_offset, metadata)


def _check_sizes(chunk_tokens: int, overlap: int) -> None:
    """Reject chunk sizes that cannot make progress."""
    require_int(chunk_tokens, "chunk_tokens", minimum=1)
    require_int(overlap, "overlap", minimum=0)
    if overlap >= chunk_tokens:
        raise InputError(
            f"overlap ({overlap}) must be smaller than chunk_tokens ({chunk_tokens}); "
            f"a common choice is chunk_tokens // 5 = {chunk_tokens // 5}"
        )


def _token_spans(text: str, tokenizer: Any) -> list[tuple[int, int]]:
    """Character spans of the tokens of ``text`` (no special tokens, no truncation, zero-width ones dropped)."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(
            f"chunking needs a fast (Rust-backed) tokenizer with an offset mapping, got {type(tokenizer).__name__}; "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True) or pass Embedder.tokenizer"
        )
    if not text:
        return []
    encoded = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
    )
    return [(start, end) for start, end in encoded["offset_mapping"] if end > start]


def _best_cut(text: str, spans: list[tuple[int, int]], earliest: int, latest: int) -> int:
    """The token index to end a chunk at (exclusive), between ``earliest`` and ``latest`` inclusive.

    Scans back from ``latest`` and keeps the latest cut of the highest kind:
    paragraph break > sentence end > word boundary. With none of them, cuts at ``latest``.
    """
    best_kind, best_cut = 0, latest
    for cut in range(latest, earliest - 1, -1):
        kind = _cut_kind(text, spans[cut - 1][1], spans[cut][0])
        if kind > best_kind:
            best_kind, best_cut = kind, cut
            if kind == 3:
                break
    return best_cut


def _cut_kind(text: str, left: int, right: int) -> int:
    """Rank a cut between characters ``left`` and ``right``: 3 paragraph, 2 sentence, 1 word, 0 mid-word."""
    gap = text[left:right]
    if not gap:
        return 0
    if gap.count("\n") >= 2:
        return 3
    if "\n" in gap:
        return 2
    last = left - 1
    while last > 0 and text[last] in _CLOSERS:
        last -= 1
    return 2 if last >= 0 and text[last] in _SENTENCE_END else 1
