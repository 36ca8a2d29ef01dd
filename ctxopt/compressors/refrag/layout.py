"""REFRAG's input layout [P, section 2]: the context split into k-token chunks, one embedding per chunk, and an
expanded chunk put back in place as its k ordinary token embeddings.

Chunks never cross a passage boundary (the paper chunks one retrieved context; chunking per passage is what
lets embeddings be precomputed per passage). Template, instruction, numbering and question tokens stay tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...types import CONTEXT, Prompt


@dataclass(frozen=True)
class Chunk:
    """Up to k consecutive context tokens of one passage: prompt rows [start, end), characters ``span`` of it."""

    passage: int
    start: int
    end: int
    span: tuple[int, int]
    text: str


def chunk_offsets(offsets: list[tuple[int, int]], chunk_tokens: int) -> list[tuple[int, int, int, int]]:
    """Group token character offsets into k-token chunks: (first token, end token, char start, char end)."""
    out = []
    for first in range(0, len(offsets), chunk_tokens):
        end = min(first + chunk_tokens, len(offsets))
        out.append((first, end, offsets[first][0], offsets[end - 1][1]))
    return out


def split_context(prompt: Prompt, chunk_tokens: int) -> list[Chunk]:
    """The prompt's CONTEXT tokens cut into chunks of ``chunk_tokens``, per run of one passage, in order."""
    is_context = (prompt.segment == CONTEXT).tolist()
    passage_of = prompt.passage_index.tolist()
    spans = prompt.char_spans.tolist()
    chunks: list[Chunk] = []
    row = 0
    while row < len(prompt):
        if not is_context[row]:
            row += 1
            continue
        run_end = row
        while run_end < len(prompt) and is_context[run_end] and passage_of[run_end] == passage_of[row]:
            run_end += 1
        passage = passage_of[row]
        text = prompt.passages[passage].text
        for first, end, lo, hi in chunk_offsets([tuple(s) for s in spans[row:run_end]], chunk_tokens):
            chunks.append(Chunk(passage, row + first, row + end, (lo, hi), text[lo:hi]))
        row = run_end
    return chunks


def assemble(
    token_embeds: torch.Tensor, chunks: list[Chunk], chunk_embeds: torch.Tensor, expanded: set[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder input: the prompt's token embeddings with each compressed chunk's k rows replaced by its one
    chunk embedding; an expanded chunk keeps its token embeddings. Returns (inputs_embeds, source) where
    ``source[i]`` is the prompt row of position i, or -(c + 1) for the embedding of chunk c."""
    n = token_embeds.shape[0]
    keep = torch.ones(n, dtype=torch.bool)
    source = torch.arange(n)
    for c, chunk in enumerate(chunks):
        if c in expanded:
            continue
        keep[chunk.start + 1 : chunk.end] = False
        source[chunk.start] = -(c + 1)
    source = source[keep]
    rows = token_embeds[keep].clone()
    is_chunk = source < 0
    if is_chunk.any():
        rows[is_chunk] = chunk_embeds[(-source[is_chunk] - 1)].to(rows.dtype)
    return rows, source


def surprisal_scores(chunk_ids: list[torch.Tensor]) -> torch.Tensor:
    """The heuristic policy's cheap perplexity proxy: mean log(1 + token id) per chunk.

    [P]'s heuristic expands the chunks with the highest perplexity, which needs a decoder pass over the full
    context, the very cost REFRAG avoids. A byte-level BPE vocabulary is built by merges in order of
    frequency, so a token's id ranks its frequency; under Zipf's law -log p(token) = log(rank) + const, so the
    mean log id is a free estimate of a chunk's unigram log-perplexity (rare names and numbers score high).
    """
    return torch.tensor([float(torch.log1p(ids.float()).mean()) if len(ids) else 0.0 for ids in chunk_ids])


def expansion_count(expand: float, chunks: int) -> int:
    """p * L chunks, rounded, for an expansion fraction p in [0, 1]."""
    return min(chunks, int(math.floor(expand * chunks + 0.5)))
